"""The play page in headless Chromium (Selenium): a full IPD game against an adapter, a move that
does not parse shown back with its format, model text holding markup rendered inert, and the
controls of each game (IPD buttons, Split No-Comm numbers, Trust-and-Split message and coins) with
the running-score chart (one engine start for the module; `make browser` installs Chromium and its
driver)."""

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
    from support import free_port

    from reciprocity.serve import ServeConfig, start

    alpha = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "alpha", seed=1)
    port = free_port()
    config = ServeConfig(str(tiny_model_dir), {"alpha": str(alpha), "evil": str(alpha)}, port=port,
                         engine_factory="test_serve_browser:injecting_engine")  # fmt: skip
    # the replica imports the engine factory from this directory
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
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


def new_game(driver: Any, url: str, model: str, rounds: int | None = None, game: str = "ipd") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(f"{url}/")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 60)
    Select(driver.find_element(By.ID, "game")).select_by_value(game)
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


def click_and_wait(driver: Any, element_id: str, css: str | None = None) -> None:
    """Click a control (by id, or the first match of `css`) and wait for the server's answer."""
    from selenium.webdriver.common.by import By

    target = driver.find_element(By.CSS_SELECTOR, css) if css else driver.find_element(By.ID, element_id)
    target.click()
    wait(driver, lambda d: d.find_element(By.ID, "turn").get_attribute("data-busy") == "false"
         or d.find_element(By.ID, "board").get_attribute("data-done") == "true")


def chart_rounds(driver: Any) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(e.get_attribute("data-rounds")) for e in driver.find_elements(By.CSS_SELECTOR, "#chart polyline")]


def test_ipd_buttons_play_each_action_and_the_chart_follows_the_score(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    new_game(browser, url, "alpha", rounds=3)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#controls button.choice")
    assert [b.get_attribute("data-answer") for b in buttons] == ["<A>", "<B>"]
    assert [b.find_element(By.CLASS_NAME, "meaning").text for b in buttons] == ["cooperate", "defect"]
    assert chart_rounds(browser) == [0, 0]
    click_and_wait(browser, "", '#controls button[data-answer="<A>"]')
    assert texts(browser, "#log li.you .text") == ["<A>"] and "you cooperated" in texts(browser, "#log li.round")[0]
    assert chart_rounds(browser) == [1, 1]
    click_and_wait(browser, "", '#controls button[data-answer="<B>"]')
    assert texts(browser, "#log li.you .text") == ["<A>", "<B>"]
    assert "you defected" in texts(browser, "#log li.round")[1]
    click_and_wait(browser, "", '#controls button[data-answer="<A>"]')
    assert browser.find_element(By.ID, "final").is_displayed() and chart_rounds(browser) == [3, 3]
    assert browser.find_element(By.ID, "error").text == ""
    sid = browser.find_element(By.ID, "board").get_attribute("data-session")
    state = httpx.get(f"{url}/play/{sid}", timeout=30).json()
    assert len(state["points"]) == 3 and sum(p[0] for p in state["points"]) == state["score"]["you"]


def test_split_nocomm_numbers_compose_the_proposal(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    new_game(browser, url, "alpha", rounds=2, game="split_nocomm")
    fields = browser.find_elements(By.CSS_SELECTOR, "#controls input[type=number]")
    assert [f.get_attribute("name") for f in fields] == ["hats", "books", "balls"]
    assert all((f.get_attribute("min"), f.get_attribute("max")) == ("0", "10") for f in fields)
    assert all("worth" in label.text for label in browser.find_elements(By.CSS_SELECTOR, "#controls label"))
    for round_, values in enumerate(((7, 2, 5), (0, 10, 3))):
        for f, v in zip(fields if round_ == 0 else browser.find_elements(By.CSS_SELECTOR, "#controls input"),
                        values, strict=True):
            f.clear()
            f.send_keys(str(v))
        click_and_wait(browser, "propose")
        assert browser.find_element(By.ID, "error").text == ""
        assert texts(browser, "#log li.you .text")[-1] == "Proposal: {} hats, {} books, {} balls".format(*values)
        played = f"you proposed {values[0]} hats, {values[1]} books, {values[2]} balls"
        assert played in texts(browser, "#log li.round")[-1]
    assert browser.find_element(By.ID, "final").is_displayed() and chart_rounds(browser) == [2, 2]


def test_trust_and_split_message_claim_and_coins(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    new_game(browser, url, "alpha", rounds=2, game="trust_and_split")
    sent = {"message": 0, "coins": 0}
    while browser.find_element(By.ID, "board").get_attribute("data-done") != "true":
        if browser.find_elements(By.ID, "say"):  # the message step: a claim picked, words typed around it
            claim = Select(browser.find_element(By.ID, "claim"))
            assert [o.text for o in claim.options][1:] == ["My hand is rock.", "My hand is paper.",
                                                           "My hand is scissors."]
            box = browser.find_element(By.ID, "message-text")
            box.send_keys("Hello <there>")  # refused on the page: a message cannot hold < or >
            browser.find_element(By.ID, "say").click()
            assert "cannot hold < or >" in browser.find_element(By.ID, "error").text
            box.clear()
            box.send_keys("Hello.")
            claim.select_by_visible_text("My hand is paper.")
            assert box.get_attribute("value") == "Hello. My hand is paper."
            click_and_wait(browser, "say")
            assert texts(browser, "#log li.you .text")[-1] == "<<message_start>>Hello. My hand is paper.<<message_end>>"
            sent["message"] += 1
        else:
            coins = browser.find_element(By.ID, "field-coins")
            assert (coins.get_attribute("min"), coins.get_attribute("max")) == ("0", "10")
            coins.clear()
            coins.send_keys("6")
            click_and_wait(browser, "propose")
            assert texts(browser, "#log li.you .text")[-1] == "<<proposal_start>> 6 <<proposal_end>>"
            assert "you kept 6 coins" in texts(browser, "#log li.round")[-1]
            sent["coins"] += 1
        assert browser.find_element(By.ID, "error").text == ""
    assert sent == {"message": 2, "coins": 2} and chart_rounds(browser) == [2, 2]
    assert browser.find_element(By.ID, "final").is_displayed()


def test_the_rounds_placeholder_is_not_cut(url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 60)
    text_px, room_px = browser.execute_script("""
        const i = document.getElementById('rounds'), cs = getComputedStyle(i);
        const c = document.createElement('canvas').getContext('2d'); c.font = cs.font;
        return [c.measureText(i.placeholder).width,
                i.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)];""")
    assert text_px + 20 <= room_px  # 20 px: Chromium's spin buttons inside a number input
    assert browser.execute_script("return document.styleSheets.length") == 1
