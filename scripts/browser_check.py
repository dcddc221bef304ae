#!/usr/bin/env python3
"""Render a vlmcredit report in headless Chromium: screenshot, console errors, offline check.

    python scripts/browser_check.py                      # builds a demo report from test runs
    python scripts/browser_check.py --keep demo-report/  # ... and keeps it
    python scripts/browser_check.py report.html --screenshot shot.png [--full-page]

Talks to Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe), so it needs
nothing beyond the standard library and a Chromium binary (`apt-get install chromium`). Fails
(exit 1) on any console error, uncaught exception, error log entry, request that leaves the
page (anything but data: URIs and the report file itself), broken image, or script element.
Exit 2 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A minimal DevTools client over Chromium's fd 3 (commands) / fd 4 (replies) pipe."""

    def __init__(self, binary: str, profile: str) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Move the child's ends above the fds we want them at, so the dup2 calls cannot clobber.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire() -> None:  # runs in the child before exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [
            binary,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # containers run as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(child_in)
        os.close(child_out)
        self.write_fd = to_chrome_w
        self.read_fd = from_chrome_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(max(0.1, deadline - time.monotonic()))
            if event.get("method") == method:
                return event
            self.events.append(event)

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console messages, image decode errors)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(self._read(max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                return

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to close
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.write_fd)
        os.close(self.read_fd)


def check_report(
    report: Path,
    screenshot: Path,
    binary: str,
    width: int = 1280,
    height: int = 900,
    full_page: bool = False,
) -> dict[str, Any]:
    """Load `report`, collect problems, save a PNG screenshot; returns what was found."""
    url = report.resolve().as_uri()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vlmcredit-chromium-") as profile:
        tools = DevTools(binary, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.send(f"{domain}.enable", session=session)
            tools.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            started = time.monotonic()
            tools.send("Page.navigate", {"url": url}, session=session)
            tools.wait_for("Page.loadEventFired", timeout=60)
            load_seconds = time.monotonic() - started
            tools.drain(1.0)
            facts = tools.send(
                "Runtime.evaluate",
                {
                    "expression": (
                        "JSON.stringify({images: document.images.length,"
                        "broken: [...document.images].filter(i => !i.complete ||"
                        " i.naturalWidth === 0).length,"
                        "scripts: document.scripts.length,"
                        "sections: document.querySelectorAll('section').length,"
                        "elements: document.getElementsByTagName('*').length,"
                        "height: document.documentElement.scrollHeight})"
                    ),
                    "returnByValue": True,
                },
                session=session,
            )
            page = json.loads(facts["result"]["value"])
            shot_params: dict[str, Any] = {"format": "png"}
            if full_page:
                tall = min(int(page["height"]), 16000)  # Chromium's texture limit is ~16k px
                tools.send(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": tall, "deviceScaleFactor": 1, "mobile": False},
                    session=session,
                )
            shot = tools.send("Page.captureScreenshot", shot_params, session=session, timeout=60)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            tools.drain(0.2)
        finally:
            tools.close()
    for event in tools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            problems.append(f"console.{params['type']}: {' '.join(texts)}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append(f"log: {params['entry'].get('text')}")
        elif method == "Network.requestWillBeSent":
            request_url = params["request"]["url"]
            if not request_url.startswith("data:") and request_url != url:
                problems.append(f"request leaves the page: {request_url[:120]}")
        elif method == "Network.loadingFailed":
            problems.append(f"load failed: {params.get('errorText')}")
    if page["broken"]:
        problems.append(f"{page['broken']} of {page['images']} images did not decode")
    if page["scripts"]:
        problems.append(f"{page['scripts']} script element(s) in the page")
    return {
        "report": str(report),
        "bytes": report.stat().st_size,
        "load_seconds": round(load_seconds, 2),
        "screenshot": str(screenshot),
        "problems": problems,
        **page,
    }


def demo_report(folder: Path) -> Path:
    """The demo's report, built by the real pipelines on the built-in tiny model. (Hostile
    token text and names are checked by tests/reports on runs the real commands wrote.)"""
    sys.path.insert(0, str(ROOT))
    from vlmcredit.pipelines.demo import run_demo

    return run_demo(folder / "demo", echo=lambda _line: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", nargs="?", type=Path, help="report.html (default: build one)")
    parser.add_argument("--screenshot", type=Path, default=Path("report-screenshot.png"))
    parser.add_argument("--chromium", help="Chromium binary (default: search PATH)")
    parser.add_argument("--full-page", action="store_true", help="Capture the whole page.")
    parser.add_argument("--keep", type=Path, help="Without REPORT: write the demo runs here.")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    binary = find_chromium(args.chromium)
    if binary is None:
        print(
            "browser-check: no Chromium found (tried " + ", ".join(CANDIDATES) + "); "
            "install it, e.g. apt-get install -y chromium, or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="vlmcredit-report-") as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        report = args.report or demo_report(args.keep or Path(tmp))
        if not report.is_file():
            print(f"browser-check: {report}: no such file", file=sys.stderr)
            return 2
        result = check_report(
            report, args.screenshot, binary, args.width, args.height, args.full_page
        )
    print(json.dumps(result, indent=2))
    if result["problems"]:
        print(f"browser-check: FAILED, {len(result['problems'])} problem(s)", file=sys.stderr)
        return 1
    print(f"browser-check: ok, screenshot in {args.screenshot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
