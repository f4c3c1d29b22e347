"""OpenTelemetry for the gateway: the providers and their set-up, metric export,
the span pipe to the exporter process and that process itself, span records,
flow spans, the per-process flow recorder, and the OTLP encoder.

Semi-public, as ``trio.lowlevel`` is: a plugin may import the modules
``__all__`` lists (the built-in ``telemetry`` plugin is a thin hook adaptor over
``recorder``; ``providers`` sets up the SDK, ``flows`` and ``records`` say what a
flow's spans hold). They change less often than the core's private modules, and
never silently: a change is called out with the release. The other modules
here (metric export, the span pipe, the exporter process, the OTLP encoder,
export counts) are their internals. A plugin that only adds its own metrics
needs none of this: the OpenTelemetry API is enough (docs/plugins.md).
"""

__all__ = ["flows", "providers", "recorder", "records"]
