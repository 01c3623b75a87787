"""The compare page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``make install-test`` installs) driven by selenium. The page is built
from a ``compare.json`` made here (no training): it loads without console errors, every figure
is there with a non-zero size, nothing is wider than a 1280-pixel window, and a screenshot is
written."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from peftkit.compare import html, report

CHROMEDRIVER = "/usr/bin/chromedriver"
METHODS = {  # method: (trainable params, adapter bytes, accuracy at the largest size, seconds, forgetting)
    "lora": (2_147, 9_876, 0.84, 60.0, 0.004), "ia3": (419, 2_810, 0.79, 40.0, 0.001),
    "prompt": (10_240, 41_000, 0.71, 45.0, 0.0005), "full": (22_700_000, 90_900_000, 0.86, 180.0, 0.09),
}


def sample_document() -> dict:
    runs = []
    for size in (100, 400):
        for method, (params, size_bytes, acc, secs, forget) in METHODS.items():
            for seed in (0, 1):
                value = acc - (0.08 if size == 100 else 0.0) + 0.01 * seed
                runs.append({"method": method, "seed": seed, "train_size": size, "accuracy": value,
                             "train_accuracy": value + 0.05, "trainable_params": params, "adapter_bytes": size_bytes,
                             "train_seconds": secs * size / 400, "peak_memory_bytes": 50_000_000 + params * 16,
                             "forgetting": forget, "error": None,
                             "loss_curve": [[s, 0.7 * math.exp(-s / 15) + 0.2 + 0.02 * seed] for s in range(1, 41)],
                             "eval_curve": [[20, 0.4], [40, 0.35]]})
    runs.append({"method": "vera", "seed": 0, "train_size": 400, "trainable_params": None, "adapter_bytes": None,
                 "train_seconds": None, "peak_memory_bytes": None, "forgetting": None,
                 "error": "--r does not apply to --method vera <script>alert(1)</script>"})
    return {"task": "classify", "metric": "accuracy", "runs": runs, "summary": report.summarize(runs, "accuracy"),
            "settings": {"model": "minilm", "data": "train.tsv", "eval_source": "dev.tsv", "max_steps": 40,
                         "seeds": [0, 1], "device": "cpu"}}


def chrome(tmp_path: Path):
    if not (os.path.exists(CHROMEDRIVER) and (shutil.which("chromium") or os.path.exists("/usr/bin/chromium"))):
        pytest.fail(f"{CHROMEDRIVER} or chromium is missing: run `make install-test` (it installs Debian's chromium "
                    "and chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: run `make install-test` (it is in the test extra)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1280, 900)
    return driver


def test_page_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "compare.html"
    html.write_page(page, sample_document())
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.replace("&lt;script&gt;", "")  # the error text is escaped, the page has no script
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    driver = chrome(tmp_path)
    try:
        driver.get(page.as_uri())
        assert driver.title.startswith("peftkit compare")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
        for fig_id in html.FIGURES:
            element = driver.find_element(By.ID, fig_id)
            assert element.tag_name == "svg"
            size = element.size
            assert size["width"] > 200 and size["height"] > 100, (fig_id, size)
            assert element.location["x"] + size["width"] <= 1280, (fig_id, element.location, size)
        # two figures side by side at 1280 px
        a, b = (driver.find_element(By.ID, f).location for f in ("fig-quality-params", "fig-quality-bytes"))
        assert a["y"] == b["y"] and b["x"] > a["x"]
        width = driver.execute_script("return document.documentElement.scrollWidth")
        inner = driver.execute_script("return window.innerWidth")
        assert width <= inner, (width, inner)  # no horizontal scrolling at 1280 px
        rows = driver.find_elements(By.CSS_SELECTOR, "table tr")
        assert len(rows) == 2 * (1 + len(METHODS)) + 1  # two tables (header + methods), the failed vera row
        assert driver.find_elements(By.CSS_SELECTOR, "td.best")
        shot = tmp_path / "compare.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
    json.dumps(sample_document())  # the sample is what compare.json holds: strict JSON
