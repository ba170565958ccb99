"""A screenshot of the rating page for docs/img: a copy of a blind folder served, one pair half-rated.

Run: ``python benchmarks/blind_screenshot.py DIR docs/img/blind_rate.png`` (needs chromium,
chromedriver and selenium, as tests/test_blind_browser.py does). DIR's own ratings are untouched:
the page serves a copy without them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from moekit.blind.server import RatingStore, make_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("out")
    parser.add_argument("--index", type=int, default=2, help="rate this many pairs first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "blind"
        shutil.copytree(args.dir, copy, ignore=shutil.ignore_patterns("ratings", "unblind", "key.json"))
        (copy / "ratings").mkdir()
        server = make_server(RatingStore(copy, "demo"), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp}/profile",
            "--window-size=1200,820",
        ):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            wait = WebDriverWait(driver, 15)
            for i in range(args.index):
                wait.until(
                    lambda d, i=i: d.find_element(By.TAG_NAME, "body").get_attribute("data-index") == str(i)
                )
                driver.find_element(By.ID, "v-tie").click()
            wait.until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-index") == str(args.index)
            )
            driver.find_element(By.ID, "scoreL4").click()
            driver.find_element(By.ID, "scoreR2").click()
            wait.until(lambda d: "on" in d.find_element(By.ID, "scoreR2").get_attribute("class"))
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            server.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
