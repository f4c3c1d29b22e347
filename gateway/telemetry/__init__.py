"""OpenTelemetry for the gateway: the providers and their set-up, metric export,
the span pipe to the exporter process and that process itself, span records,
flow spans, and the OTLP encoder.

Semi-public, as ``trio.lowlevel`` is: a telemetry plugin may import its modules
(``gateway.telemetry.providers``, ``.flows``, ``.records``); they change less often
than the core's private modules.
"""
