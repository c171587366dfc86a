"""A real browser on the studio: headless Chromium (the system package) driven by Selenium opens
the page, shows a bad request's message, uploads a clip, types text, chooses the engine,
previews, generates, and finds the result and the side-by-side video; it saves a screenshot.

Set MUSETALK_SCREENSHOT_DIR to keep the screenshots (the README's picture is made this way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_app import SHORT_TEXT, launched_app, services  # noqa: F401  (services: the studio with tiny models)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_FOR_PAGE = 180  # generous: a loaded CI machine is slow, and only a failure waits this long
WAIT_FOR_DUB = 480  # a shared CI machine can be slow; a failure keeps a screenshot

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs the Chromium browser and its driver: apt-get install chromium chromium-driver (.ci/run does)",
)


@contextmanager
def chromium(profile: Path, *flags: str, height: int = 2000):
    """Headless Chromium driven by Selenium, with its own profile folder and any extra ``flags``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--window-size=1400,{height}", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={profile}", *flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def page(services, browser, monkeypatch_module):  # noqa: F811
    monkeypatch_module.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with launched_app(services) as url:
        browser.get(url)
        yield browser


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def wait_for(driver, condition, seconds: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.25).until(condition)
    except TimeoutException:
        shot = keep_screenshot(driver, f"timeout-{what.replace(' ', '-')}.png")
        raise AssertionError(f"the page did not show {what} within {seconds} s (screenshot: {shot}); "
                             f"its text: {page_text(driver)[:600]!r}") from None


def keep_screenshot(driver, name: str, folder: Path | None = None) -> Path:
    fallback = Path(tempfile.gettempdir()) / "musetalk-browser-screenshots"
    folder = Path(os.environ.get("MUSETALK_SCREENSHOT_DIR") or folder or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    driver.save_screenshot(str(path))
    return path


def element(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def click(driver, selector: str) -> None:
    """Click ``selector`` once nothing covers it: just after an upload the page is still laid out (the
    video's player grows its row), and a click then lands on whatever is over the button for a moment."""
    from selenium.common.exceptions import ElementClickInterceptedException

    def clicked(d) -> bool:
        try:
            element(d, selector).click()
            return True
        except ElementClickInterceptedException:
            return False

    wait_for(driver, clicked, WAIT_FOR_PAGE, f"{selector} clickable")


def page_text(driver) -> str:
    return element(driver, "body").text


def video_source(selector: str):
    """A condition: the <video> inside ``selector`` has a source, which it returns."""

    def loaded(driver):
        from selenium.common.exceptions import NoSuchElementException

        try:
            return element(driver, f"{selector} video").get_attribute("src") or False
        except NoSuchElementException:
            return False

    return loaded


def test_dub_from_text_in_the_browser(page, face_clip, tmp_path):
    from selenium.webdriver.common.by import By

    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#video-upload input[type=file]"), WAIT_FOR_PAGE,
             "the upload field")
    assert "MuseTalk Studio" in page.title

    # A request without speech is answered with the library's message, not a trace.
    element(page, "#video-upload input[type=file]").send_keys(str(face_clip))
    # The name shows as "face" and ".mp4" in two elements (the stem may be cut short, never the suffix).
    wait_for(page, lambda d: face_clip.name in element(d, "#video-upload").text.replace("\n", ""), WAIT_FOR_PAGE,
             "the uploaded file's name")
    click(page, "#generate-button")
    wait_for(page, lambda d: "give the new speech" in page_text(d), WAIT_FOR_PAGE, "the missing-speech message")
    assert "Traceback" not in page_text(page)
    element(page, ".toast-close").click()  # the message stays until closed
    wait_for(page, lambda d: "give the new speech" not in page_text(d), WAIT_FOR_PAGE, "the message closed")

    # Text for the default offline voice, then Generate.
    page.find_element(By.XPATH, "//*[@id='speech-from']//label[normalize-space()='Text']").click()
    text_box = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#speech-text textarea").is_displayed()
                        and d.find_element(By.CSS_SELECTOR, "#speech-text textarea"), WAIT_FOR_PAGE, "the text box")
    text_box.send_keys(SHORT_TEXT)
    # The preview engine: MuseTalk runs through the API tests; here it keeps the page's picture
    # readable (the tiny test models draw noise where the mouth is).
    page.find_element(By.XPATH, "//*[@id='engine']//label[starts-with(normalize-space(), 'Preview')]").click()
    element(page, "#advanced-options").click()  # the scores are tested through the API; skip them here
    measure = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#measure input").is_displayed()
                       and d.find_element(By.CSS_SELECTOR, "#measure input"), WAIT_FOR_PAGE, "the Measure box")
    measure.click()
    assert not measure.is_selected()
    element(page, "#preview-button").click()
    wait_for(page, lambda d: "the model sees the yellow box" in page_text(d), WAIT_FOR_PAGE, "the preview")
    click(page, "#generate-button")

    result = wait_for(page, video_source("#result-video"), WAIT_FOR_DUB, "the dubbed video")
    side = wait_for(page, video_source("#side-by-side-video"), WAIT_FOR_PAGE, "the side-by-side video")
    assert result != side
    wait_for(page, lambda d: "the face was redrawn" in page_text(d), WAIT_FOR_PAGE, "the summary")
    assert "(preview v15" in page_text(page)
    assert "whole job" in page_text(page)  # the timings table
    page.execute_script("window.scrollTo(0, 0)")
    shot = keep_screenshot(page, "studio.png", tmp_path)
    assert shot.stat().st_size > 20_000


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_a_longer_job_shows_its_progress_and_plays_before_it_ends(page):
    """A 7.5 s dub of the example (preview engine): the bar names face analysis and generation with
    their frame counts as they advance, and, where the streaming player works, the dub plays early;
    then the side-by-side comes with its own bar."""
    import time

    from selenium.webdriver.common.by import By

    page.refresh()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#video-upload input[type=file]"), WAIT_FOR_PAGE,
             "the upload field")
    element(page, "#video-upload input[type=file]").send_keys(str(EXAMPLES / "face.mp4"))
    wait_for(page, lambda d: "face.mp4" in element(d, "#video-upload").text.replace("\n", ""), WAIT_FOR_PAGE,
             "the uploaded video")
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#speech-audio input[type=file]"), WAIT_FOR_PAGE,
             "the audio upload")
    element(page, "#speech-audio input[type=file]").send_keys(str(EXAMPLES / "speech.wav"))
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#speech-audio audio, #speech-audio .waveform-container,"
                                             " #speech-audio [data-testid='waveform-controls']"),
             WAIT_FOR_PAGE, "the uploaded audio")
    page.find_element(By.XPATH, "//*[@id='engine']//label[starts-with(normalize-space(), 'Preview')]").click()
    streaming = element(page, "#stream-video").is_displayed() if page.find_elements(By.ID, "stream-video") else False
    click(page, "#generate-button")

    seen, played_early, shot, deadline = [], False, None, time.monotonic() + WAIT_FOR_DUB
    while time.monotonic() < deadline:
        text = page_text(page)
        seen += [line for line in text.splitlines() if "frame" in line and " of " in line]
        if not shot and any("generating, frame" in line and " left" in line for line in seen):
            page.execute_script("window.scrollTo(0, 0)")
            shot = keep_screenshot(page, "studio_progress.png")  # the README's picture of a running job
        if streaming and not video_source("#result-video")(page):
            played_early = played_early or page.execute_script(
                "const v = document.querySelector('#stream-video video'); return !!v && v.currentTime > 0;")
        if video_source("#result-video")(page):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the dub did not finish in {WAIT_FOR_DUB} s; progress seen: {seen[-5:]}")
    faces = {line for line in seen if "face analysis, frame" in line}
    generating = {line for line in seen if "generating, frame" in line}
    assert len(faces) >= 2 and len(generating) >= 2, f"the bar did not advance through both stages: {seen}"
    assert any(" left" in line for line in seen), "a time left once the rate is known"
    if streaming:
        assert played_early, "the streamed dub did not start playing before the job ended"
    # Then the side-by-side, made once the dub is there, with a bar of its own counting its frames.
    beside = []
    while time.monotonic() < deadline and not video_source("#side-by-side-video")(page):
        beside += [line for line in page_text(page).splitlines() if "side-by-side video: frame" in line]
        time.sleep(0.1)
    assert video_source("#side-by-side-video")(page), "the side-by-side video did not come after the dub"
    assert beside, "the side-by-side's progress was not shown"


def tab(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")


def table_rows(driver, selector: str) -> list[str]:
    """The texts of a Gradio table's rows (its cells joined by " | "), read in one script: the table
    is redrawn as it changes, so elements found one by one go stale."""
    texts = driver.execute_script("""
        const rows = {};
        for (const cell of document.querySelectorAll(arguments[0] + ' [role=gridcell][data-row]')) {
            (rows[cell.dataset.row] = rows[cell.dataset.row] || []).push(cell.innerText.trim());
        }
        return Object.keys(rows).sort((a, b) => a - b).map(row => rows[row]);""", selector)
    return [" | ".join(cells) for cells in texts if any(cells)]  # an empty table shows one blank row


def test_compare_refuses_a_duplicate_variant_and_the_history_keeps_every_result(page, face_clip):
    """Compare: the current settings added once, refused the second time with a note naming the row,
    a second variant (another mask), the grid; then the History tab lists this session's results."""
    from selenium.webdriver.common.by import By

    page.refresh()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#video-upload input[type=file]"), WAIT_FOR_PAGE,
             "the upload field")
    element(page, "#video-upload input[type=file]").send_keys(str(face_clip))
    wait_for(page, lambda d: face_clip.name in element(d, "#video-upload").text.replace("\n", ""), WAIT_FOR_PAGE,
             "the uploaded file's name")
    page.find_element(By.XPATH, "//*[@id='speech-from']//label[normalize-space()='Text']").click()
    text_box = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#speech-text textarea").is_displayed()
                        and d.find_element(By.CSS_SELECTOR, "#speech-text textarea"), WAIT_FOR_PAGE, "the text box")
    text_box.send_keys(SHORT_TEXT)
    page.find_element(By.XPATH, "//*[@id='engine']//label[starts-with(normalize-space(), 'Preview')]").click()

    tab(page, "Compare").click()
    element(page, "#clear-variants").click()
    wait_for(page, lambda d: not table_rows(d, "#variants"), WAIT_FOR_PAGE, "an empty variants table")
    element(page, "#add-variant").click()
    wait_for(page, lambda d: len(table_rows(d, "#variants")) == 1, WAIT_FOR_PAGE, "the first variant")
    element(page, "#add-variant").click()
    wait_for(page, lambda d: "already has these settings" in page_text(d), WAIT_FOR_PAGE, "the duplicate refused")
    assert "Not added: row 1" in page_text(page)
    assert len(table_rows(page, "#variants")) == 1

    element(page, "#advanced-options").click()
    wait_for(page, lambda d: d.find_element(By.ID, "mask-mode").is_displayed(), WAIT_FOR_PAGE, "the mask choice")
    page.find_element(By.XPATH, "//*[@id='mask-mode']//label[starts-with(normalize-space(), 'Mouth')]").click()
    element(page, "#add-variant").click()
    wait_for(page, lambda d: len(table_rows(d, "#variants")) == 2, WAIT_FOR_PAGE, "the second variant")
    assert "mouth" in table_rows(page, "#variants")[1]

    element(page, "#compare-button").click()
    wait_for(page, video_source("#grid-video"), WAIT_FOR_DUB, "the comparison grid")
    wait_for(page, lambda d: len(table_rows(d, "#comparison-table")) == 2, WAIT_FOR_PAGE, "one row per variant")

    tab(page, "History").click()
    wait_for(page, lambda d: any("comparison" in row for row in table_rows(d, "#history")), WAIT_FOR_PAGE,
             "the comparison in the history")
    # The module's earlier dubs, made in other page loads, are not this session's.
    assert all("dub" not in row.split() for row in table_rows(page, "#history"))
