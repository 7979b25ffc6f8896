"""Open a run's offline report in headless Chromium (Debian's `chromium`): take a screenshot, or
dump the DOM it rendered (used by tests/test_explain.py).

    python tests/scripts/screenshot_report.py stores/runs/default/report/index.html report.png
    python tests/scripts/screenshot_report.py REPORT.html OUT.png --window-size 1400,5000

Chromium runs with no network (every host name resolves to nothing), its own throw-away profile,
and --no-sandbox (the CI container runs as root).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    """The first Chromium on PATH, or None."""
    return next((path for path in map(shutil.which, BINARIES) if path), None)


def run_chromium(page: Path, *flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (a file) with `flags`, offline, in a fresh profile."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="tinyonn-chromium-") as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                   "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                   "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", *flags,
                   Path(page).resolve().as_uri()]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, out: Path, window_size: str = "1400,4000") -> Path:
    """A PNG of the page at `window_size` (width,height in pixels)."""
    out = Path(out).resolve()
    out.unlink(missing_ok=True)
    result = run_chromium(page, f"--screenshot={out}", f"--window-size={window_size}")
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return out


def dump_dom(page: Path) -> str:
    """The DOM Chromium built for the page, after it loaded (scripts run), as HTML."""
    result = run_chromium(page, "--dump-dom")
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="the report's index.html")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--window-size", default="1400,4000", help="width,height in pixels")
    args = parser.parse_args(argv)
    print(screenshot(Path(args.page), Path(args.out), args.window_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
