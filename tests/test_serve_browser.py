"""The play page in headless Chromium (Selenium): a full IPD game against an adapter, a move that
does not parse shown back with its format, and model text holding markup rendered inert (one
engine start for the module; `make browser` installs Chromium and its driver)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllm_support import make_adapter

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INJECTED = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


def injecting_engine(config: Any) -> Any:
    """The real engine, except that adapter `evil` "writes" markup (a guided model cannot)."""
    from actors.vllm_engine import VLLMEngine
    from reciprocity.serve import engine_kwargs, read_adapters

    class InjectingEngine(VLLMEngine):
        async def generate(self, prompt_token_ids: list[int], sampling: Any, adapter: str | None) -> Any:
            gen = await super().generate(prompt_token_ids, sampling, adapter)
            return dataclasses.replace(gen, text=INJECTED) if adapter == "evil@v0" else gen

    return InjectingEngine(config.model, **engine_kwargs(config, read_adapters(config)))


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve
    from test_serve import free_port

    from reciprocity.serve import ServeConfig, start

    alpha = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "alpha", seed=1)
    port = free_port()
    config = ServeConfig(str(tiny_model_dir), {"alpha": str(alpha), "evil": str(alpha)}, port=port,
                         engine_factory="test_serve_browser:injecting_engine")  # fmt: skip
    # the replica imports the engine factory from this directory
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    try:
        start(config)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(DRIVER).exists(), "no Chromium: run `make browser`"
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, condition: Any, timeout: float = 180) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def new_game(driver: Any, url: str, model: str, rounds: int | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(f"{url}/")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 60)
    Select(driver.find_element(By.ID, "game")).select_by_value("ipd")
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    Select(driver.find_element(By.ID, "seat")).select_by_value("alice")
    if rounds:
        driver.find_element(By.ID, "rounds").send_keys(str(rounds))
    driver.find_element(By.ID, "start").click()
    wait(driver, lambda d: d.find_element(By.ID, "board").get_attribute("data-session"))


def send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "move")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled())


def texts(driver: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def js_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def test_full_ipd_game_on_the_page(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    new_game(browser, url, "alpha")
    assert "<A>" in browser.find_element(By.ID, "rules").text and "exactly <A> or <B>" in browser.find_element(
        By.ID, "format"
    ).text
    send(browser, "I cooperate")  # does not parse: shown back with the expected format, not played
    error = browser.find_element(By.ID, "error").text
    assert "I cooperate" in error and "Expected format: exactly <A> or <B>" in error and texts(browser, "#log li") == []
    send(browser, "<script>window.__pwned = 3</script>")  # the human's own markup, echoed back
    assert "<script>window.__pwned = 3</script>" in browser.find_element(By.ID, "error").text
    for i in range(10):
        send(browser, "<A>" if i % 3 else "<B>")
        assert browser.find_element(By.ID, "error").text == ""
        assert len(texts(browser, "#log li.round")) == i + 1
    final = browser.find_element(By.ID, "final")
    wait(browser, lambda d: final.is_displayed(), 30)
    sid = browser.find_element(By.ID, "board").get_attribute("data-session")
    state = httpx.get(f"{url}/play/{sid}", timeout=30).json()
    you, agent = (js_number(state["score"][k]) for k in ("you", "agent"))
    assert state["done"] and final.text == f"Game over. Final score: you {you}, the agent {agent}."
    assert browser.find_element(By.ID, "score-you").text == you
    assert len(texts(browser, "#log li.agent .text")) == 10
    assert set(texts(browser, "#log li.agent .text")) <= {"<A>", "<B>"}
    assert not browser.find_element(By.ID, "turn").is_displayed()
    assert browser.execute_script("return window.__pwned === undefined")


def test_agent_markup_renders_as_text(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    new_game(browser, url, "evil", rounds=2)
    title = browser.title
    send(browser, "<A>")
    send(browser, "<B>")
    agent = texts(browser, "#log li.agent .text")
    assert agent == [INJECTED, INJECTED]  # visible literally
    assert "the agent's answer was invalid" in texts(browser, "#log li.round")[0]
    assert browser.execute_script("return document.querySelectorAll('#log script, #log img').length") == 0
    assert browser.execute_script("return window.__pwned === undefined") and browser.title == title
    assert browser.find_element(By.ID, "final").is_displayed()
