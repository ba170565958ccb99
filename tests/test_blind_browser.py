"""The rating page in a real browser: headless Debian chromium driven by selenium.

Clicks and keys through a rating run, reloads mid-way to check that the page resumes where the
rater stopped, and checks every saved line. Skips (saying why) without chromium, chromedriver or
selenium; CI installs them (.ci/run). With MOEKIT_BLIND_SCREENSHOT=FILE.png it also saves a
screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from moekit.blind import SystemSpec, make_blind, read_ratings, unblinded_pairs, write_unblind
from moekit.blind.ratings import rater_file
from moekit.blind.server import RatingStore, make_server
from moekit.blind.spec import Prompt

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="needs selenium (pip install 'moekit[blind]')"
    )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path):
    specs = [SystemSpec(model="/m/a", name="SECRET_A"), SystemSpec(model="/m/b", name="SECRET_B")]
    prompts = [Prompt(str(i), f"def task_{i}(x):") for i in range(6)]
    out = make_blind(
        specs,
        prompts,
        tmp_path / "blind",
        seed=11,
        answer=lambda s, texts, c: [f"    return x + {i}  # {s.model[-1]}" for i in range(len(texts))],
    )
    server = make_server(RatingStore(out), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_rating_run_in_chromium(browser, served):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out, url = served
    wait = WebDriverWait(browser, 15)

    def at(index):
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-index") == str(index))

    def keys(*seq):
        ActionChains(browser).send_keys(*seq).perform()

    browser.get(url)
    wait.until(lambda d: d.find_element(By.ID, "who").is_displayed())
    browser.find_element(By.ID, "whoid").send_keys("ann")
    browser.find_element(By.ID, "whogo").click()
    at(0)
    assert "SECRET" not in browser.page_source
    # pair 0 with the mouse: scores, then the verdict (which moves on once saved)
    browser.find_element(By.ID, "scoreL4").click()
    browser.find_element(By.ID, "scoreR2").click()
    wait.until(lambda d: "on" in d.find_element(By.ID, "scoreR2").get_attribute("class"))
    browser.find_element(By.ID, "v-left").click()
    at(1)
    # pair 1 with the keyboard: score A 3, score B 5 (Shift+5), a comment, then B is better
    keys("3")
    wait.until(lambda d: "on" in d.find_element(By.ID, "scoreL3").get_attribute("class"))
    ActionChains(browser).key_down(Keys.SHIFT).send_keys("5").key_up(Keys.SHIFT).perform()
    wait.until(lambda d: "on" in d.find_element(By.ID, "scoreR5").get_attribute("class"))
    keys("c")
    wait.until(lambda d: d.switch_to.active_element.get_attribute("id") == "comment")
    keys("B is shorter and right", Keys.ESCAPE)
    keys("b")
    at(2)
    keys("t")
    at(3)
    progress = browser.find_element(By.ID, "progress").text
    assert "3 rated" in progress and "pair 4 of 6" in progress
    if os.environ.get("MOEKIT_BLIND_SCREENSHOT"):
        browser.save_screenshot(os.environ["MOEKIT_BLIND_SCREENSHOT"])
    # a reload (or a closed tab) resumes at the first pair without a verdict
    browser.get(url + "?rater=ann")
    at(3)
    assert browser.find_element(By.ID, "progress").text == progress
    browser.find_element(By.ID, "v-both_bad").click()
    at(4)
    keys(Keys.ARROW_LEFT)
    at(5)
    # go back and amend pair 4, then finish
    keys("p")
    at(4)
    wait.until(lambda d: "on" in d.find_element(By.ID, "v-left").get_attribute("class"))
    browser.find_element(By.ID, "v-tie").click()
    at(5)
    keys(Keys.ARROW_RIGHT)
    wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "6"

    # a second rater on the same server starts from the beginning, in a file of their own
    browser.get(url + "?rater=cat")
    at(0)
    assert "0 rated" in browser.find_element(By.ID, "progress").text
    keys("a")
    at(1)
    assert [r.choice for r in read_ratings(rater_file(out, "cat"))] == ["left"]

    lines = read_ratings(rater_file(out, "ann"))
    pairs = unblinded_pairs(out)
    verdicts = [r for r in lines if r.event == "choice"]
    assert [r.choice for r in verdicts] == ["left", "right", "tie", "both_bad", "left", "tie", "right"]
    assert [r.pair_id for r in verdicts] == [p.pair_id for p in pairs[:5]] + [
        pairs[4].pair_id,
        pairs[5].pair_id,
    ]
    assert (verdicts[0].score_left, verdicts[0].score_right) == (4, 2)
    assert (verdicts[1].score_left, verdicts[1].score_right) == (3, 5)
    assert verdicts[1].comment == "B is shorter and right"
    assert [r.event for r in lines[:2]] == ["score", "score"]  # clicks before the verdict were saved too
    _, result = write_unblind([out], make_plot=False)
    h = result["head_to_head"][0]
    # ann and cat both judged the first pair; the rest are ann's alone
    assert h["wins"] + h["losses"] + h["ties"] == 6 and h["ties"] == 3 and result["num_judgments"] == 7
    assert result["agreement"]["shared_pairs"] == 1
