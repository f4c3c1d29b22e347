"""``l4gw demo`` answers curl from both backends in turn and stops cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from gwproc import free_port


def test_demo_round_robin_with_curl(tmp_path):
    port = free_port()
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while b"Try:" not in (tmp_path / "demo.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            assert time.monotonic() < deadline, "demo did not start"
            time.sleep(0.05)
        answers = [
            subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/"],
                           capture_output=True, text=True, check=True).stdout
            for _ in range(4)
        ]
        assert [a.split(" (")[0] for a in answers] == [
            "hello from backend-1", "hello from backend-2"] * 2, answers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert text.count("route=route0") == 4  # one line per connection
    assert "stopped" in text
