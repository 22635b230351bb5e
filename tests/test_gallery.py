"""The gallery page at ``/`` in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
selenium): the API key typed into the page, a user picked, generated images with their marks shown, a click
on like posting real feedback (the row is read back from PostgreSQL), and a new generation with progress.
Editing by instruction and references: on the tiny preset (neither is possible there) the page shows the
server's reason; on the toy preset an edit becomes a new generation (method edit in SQL) shown with its plan,
and a history item used as a reference conditions the next request.

Skipped, saying why, where Chromium is not installed (`make test-deps` installs it).
"""

from __future__ import annotations

import shutil
import uuid

import pytest
from conftest import make_settings, running_stack
from pigment.services.common import auth
from pigment.services.common.grpc_auth import bearer_channel
from pigment.services.common.settings import REPO_PRESETS
from pigment.services.store.tables import Feedback, Generation, RenderRequest
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from sqlalchemy import select

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Debian's chromium and chromium-driver are "
    "not installed (`make test-deps`, or apt-get install -y chromium chromium-driver)",
)
RUN = uuid.uuid4().hex[:6]
USER = f"gal{RUN}"


def blue_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 60, 220)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_preset, pg_database):
    tmp = tmp_path_factory.mktemp("gallery")
    keyfile = tmp / "keys.yaml"
    key = auth.add_key(keyfile, f"t{RUN}")
    settings = make_settings(tmp, tiny_preset, database_url=pg_database(), auth_keys_file=keyfile)
    with running_stack(settings) as (stack, channel, _worker):
        http = stack.http_server(0).start()
        ch = bearer_channel(channel, key)
        history = history_pb2_grpc.HistoryServiceStub(ch)
        history.UpsertItems(
            history_pb2.UpsertItemsRequest(
                items=[
                    history_pb2.Item(
                        item_id=f"star-{RUN}",
                        caption="a small blue star on a light background",
                        tenant=f"t{RUN}",
                        image_png=blue_png(),
                    )
                ]
            )
        )
        history.LogInteractions(
            history_pb2.LogInteractionsRequest(
                user_id=USER,
                create_user=True,
                interactions=[history_pb2.Interaction(item_id=f"star-{RUN}", kind="like")],
            )
        )
        first = generation_pb2_grpc.GenerationServiceStub(ch).GeneratePersonalized(
            gpb.GenerateRequest(
                request_id=f"g-{RUN}",
                user_id=USER,
                prompt="a star",
                num_images=2,
                num_inference_steps=2,
            ),
            timeout=120,
        )
        yield {"stack": stack, "url": http.url, "key": key, "first": first}
        http.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def test_gallery_shows_generations_and_posts_real_feedback(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(site["url"] + "/")
    wait.until(
        ec.text_to_be_present_in_element((By.ID, "status"), "401")
    )  # keys on: the page asks for one
    browser.find_element(By.ID, "api-key").send_keys(site["key"])
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#generations .card")) == 2)
    assert browser.execute_script("return sessionStorage.getItem('pigment.apiKey')") == site["key"]
    assert browser.find_element(By.ID, "user").get_attribute("value") == USER

    ids = {i.generation_id for i in site["first"].images}
    cards = browser.find_elements(By.CSS_SELECTOR, "#generations .card")
    assert {c.get_attribute("data-generation-id") for c in cards} == ids
    first = cards[0]
    assert first.find_element(By.CSS_SELECTOR, ".badge").text == "GENERATED"
    keywords = list(
        site["first"].keywords
    )  # what the gateway reported, shown as it is (none is said so)
    assert first.find_element(By.CSS_SELECTOR, ".keywords").text == (
        "keywords: " + ", ".join(keywords) if keywords else "no keywords"
    )
    assert [f.text for f in first.find_elements(By.CSS_SELECTOR, ".flag")] == list(
        site["first"].flags
    )
    wait.until(
        lambda d: d.execute_script(  # the signed image URLs load without the key
            "return [...document.querySelectorAll('#generations img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    wait.until(
        lambda d: d.execute_script(  # the user's history shows too, with the item's image
            "return [...document.querySelectorAll('#history img')].some(i => i.complete && i.naturalWidth == 32)"
        )
    )
    shot = tmp_path / "gallery.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5000

    gid = first.get_attribute("data-generation-id")
    like = first.find_element(By.CSS_SELECTOR, "button[data-kind=like]")
    like.click()
    wait.until(lambda d: "done" in like.get_attribute("class"))
    with site["stack"].sessions() as s:
        rows = s.scalars(select(Feedback).where(Feedback.generation_id == gid)).all()
    assert [(r.user_id, r.kind) for r in rows] == [(USER, "like")]

    # ask for a new image: progress, then it joins the gallery
    browser.find_element(By.ID, "prompt").send_keys("a moon")
    for field, value in (("num-images", "1"), ("steps", "2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "progress-text"), "done: 1 images"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#generations .card")) == 3)
    assert "a moon" in browser.find_elements(By.CSS_SELECTOR, "#generations .card")[0].text


def _open(browser, url, cards: int, key: str = ""):
    """The page with ``key`` in the tab's sessionStorage (as the key form leaves it), once it shows
    at least ``cards`` generations and the history."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(url + "/")
    if key:
        browser.execute_script("sessionStorage.setItem('pigment.apiKey', arguments[0])", key)
        browser.get(url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#generations .card")) >= cards)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history .use-reference"))
    return wait


def test_gallery_says_why_edit_and_references_are_refused_on_tiny(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _open(browser, site["url"], 2, site["key"])
    card = browser.find_element(By.CSS_SELECTOR, "#generations .card")
    card.find_element(By.CSS_SELECTOR, ".edit-instruction").send_keys("make it smaller")
    card.find_element(By.CSS_SELECTOR, "button.edit").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "edit failed"))
    status = browser.find_element(By.ID, "status")
    assert "400" in status.text and "no keyword vocabulary" in status.text
    assert status.get_attribute("class") == "error"

    browser.find_element(By.CSS_SELECTOR, "#history .use-reference").click()
    chips = browser.find_elements(By.CSS_SELECTOR, "#references .chip")
    assert [c.get_attribute("data-item-id") for c in chips] == [f"star-{RUN}"]
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "generate failed"))
    assert "reference_projector" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#references .chip")  # kept, to remove or retry
    browser.find_element(By.CSS_SELECTOR, "#references .chip button").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#references .chip")


TOY = REPO_PRESETS / "toy"


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory, pg_database):
    """The toy preset (keyword vocabulary and a reference projector), no keys: loopback is the local admin."""
    if not (TOY / "manifest.json").is_file():
        pytest.skip("the toy preset is not in this checkout")
    from pigment.training import toy_world as tw
    from PIL import Image

    def item_png(caption):
        import io

        buf = io.BytesIO()
        Image.fromarray(tw.render_item(tw.parse_caption(caption))).save(buf, format="PNG")
        return buf.getvalue()

    settings = make_settings(tmp_path_factory.mktemp("toygallery"), TOY, database_url=pg_database())
    with running_stack(settings) as (stack, channel, _worker):
        http = stack.http_server(0).start()
        history = history_pb2_grpc.HistoryServiceStub(channel)
        caption = "a large purple heart on a light background"
        history.UpsertItems(
            history_pb2.UpsertItemsRequest(
                items=[
                    history_pb2.Item(item_id="heart", caption=caption, image_png=item_png(caption))
                ]
            )
        )
        history.LogInteractions(
            history_pb2.LogInteractionsRequest(
                user_id=USER,
                create_user=True,
                interactions=[history_pb2.Interaction(item_id="heart", kind="like")],
            )
        )
        source = generation_pb2_grpc.GenerationServiceStub(channel).GeneratePersonalized(
            gpb.GenerateRequest(
                request_id=f"src-{RUN}",
                user_id=USER,
                num_images=1,
                verbatim_prompt=True,
                prompt="a large red star on a dark background",
                retrieval=gpb.RETRIEVAL_MODE_GENERATE_ONLY,
            ),
            timeout=180,
        )
        yield {"stack": stack, "url": http.url, "source": source.images[0].generation_id}
        http.stop()


def test_gallery_edits_an_image_and_uses_a_reference_on_toy(toy_site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _open(browser, toy_site["url"], 1)
    card = browser.find_element(By.CSS_SELECTOR, "#generations .card")
    assert card.get_attribute("data-generation-id") == toy_site["source"]
    card.find_element(By.CSS_SELECTOR, ".edit-instruction").send_keys("make the background light")
    card.find_element(By.CSS_SELECTOR, "button.edit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#generations .card")) == 2)
    top = browser.find_element(By.CSS_SELECTOR, "#generations .card")  # the edit, newest first
    assert top.find_element(By.CSS_SELECTOR, ".edit-plan").text == (
        "edit: background → light background (region background)"
    )
    assert "light background" in top.find_element(By.CSS_SELECTOR, ".written").text
    assert [b.text for b in top.find_elements(By.CSS_SELECTOR, ".badge")] == ["GENERATED", "EDIT"]
    assert "edited: background" in browser.find_element(By.ID, "status").text
    gid = top.get_attribute("data-generation-id")
    with toy_site["stack"].sessions() as s:
        row = s.get(Generation, gid)
        assert (row.user_id, row.method) == (USER, "edit")
        edit = s.get(RenderRequest, row.request_id).conditioning["edit"]
        assert (
            edit["source_generation_id"] == toy_site["source"] and edit["attribute"] == "background"
        )

    browser.find_element(
        By.CSS_SELECTOR, "#history .card[data-item-id=heart] .use-reference"
    ).click()
    assert [
        c.get_attribute("data-item-id")
        for c in browser.find_elements(By.CSS_SELECTOR, "#references .chip")
    ] == ["heart"]
    browser.find_element(By.ID, "prompt").send_keys("a star")
    for field, value in (("num-images", "1"), ("steps", "4")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(
        ec.text_to_be_present_in_element((By.ID, "progress-text"), "done: 1 images, 1 reference")
    )
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#generations .card")) == 3)
    newest = browser.find_element(By.CSS_SELECTOR, "#generations .card")
    assert newest.find_element(By.CSS_SELECTOR, ".refs").text == "from 1 reference image"
    which = newest.find_element(By.CSS_SELECTOR, ".refs img")
    assert which.get_attribute("title") == "heart"
    assert not browser.find_elements(By.CSS_SELECTOR, "#references .chip")  # used by that request
    with toy_site["stack"].sessions() as s:
        req = s.get(
            RenderRequest, s.get(Generation, newest.get_attribute("data-generation-id")).request_id
        )
        assert (
            req.params["references"] == ["item:heart"] and len(req.conditioning["references"]) == 1
        )
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#generations img')].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    shot = tmp_path / "gallery-edit.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5000
