"""Screenshot of `serve`'s web page for the README: Debian's chromium, one sentence, its heat map.

    python benchmarks/serve_screenshot.py --checkpoint RUN [-o docs/serve.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import start_server  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sentence", default="Two men are playing soccer in a park .")
    p.add_argument("-o", "--output", default=str(ROOT / "docs" / "serve.png"))
    args = p.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import chromium_driver

    proc, url, _, _ = start_server(args.checkpoint, 1, [])
    try:
        with tempfile.TemporaryDirectory() as profile:
            browser = chromium_driver(profile)
            if browser is None:
                raise SystemExit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
            try:
                browser.get(url + "/")
                browser.find_element(By.ID, "source").send_keys(args.sentence)
                browser.find_element(By.ID, "translate").click()
                WebDriverWait(browser, 300).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#attention table"))
                browser.save_screenshot(args.output)
            finally:
                browser.quit()
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
