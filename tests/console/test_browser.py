"""The console in a real browser (headless Chromium): the drone delivery runs with failures, an
operator searches a delivery, reads its history (the join, the timer with the due time the
service really set, the compensation), replays a dead letter and watches its delivery complete,
and the pages update without reloading. Token and CSRF protections are checked the same way.
Every page visited is saved as a screenshot (see tests/console/browser.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.console.browser import Browser, require_chromium
from tests.console.system import SERVICE_JOIN_TIMEOUT, ConsoleProcess, LiveSystem

pytestmark = pytest.mark.slow
TOKEN = "correct-horse-battery-staple"


def _id(tag: str) -> str:
    return f"d-{tag}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSystem]:
    require_chromium()
    system = LiveSystem(tmp_path_factory.mktemp("console"))
    system.start()
    yield system
    system.stop()


@pytest.fixture(scope="module")
def deliveries(system: LiveSystem) -> dict[str, str]:
    """Given: two completed deliveries, one rejected (too heavy: failed and compensated), and
    one whose landing report is dead-lettered (it stays in flight)."""
    ids = {"done": _id("done"), "done2": _id("done"), "heavy": _id("heavy"),
           "grounded": _id("grounded")}  # fmt: skip
    system.faults.grounded.add(ids["grounded"])
    system.submit(ids["done"])
    system.submit(ids["done2"])
    system.submit(ids["heavy"], weight_kg=45.0)
    system.submit(ids["grounded"])
    system.wait(lambda: system.outcome(ids["done"]) == "completed", "a completed delivery")
    system.wait(lambda: system.outcome(ids["heavy"]) == "failed", "a failed delivery")
    system.wait(lambda: len(system.dead_letters()) == 1, "the landing's dead letter")
    return ids


@pytest.fixture(scope="module")
def console(system: LiveSystem) -> Iterator[ConsoleProcess]:
    process = ConsoleProcess(system)
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture
def browser(console: ConsoleProcess, tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(tmp_path / "profile", console.base_url)
    yield browser
    browser.quit()


def test_search_a_delivery_and_read_its_history(
    browser: Browser, deliveries: dict[str, str]
) -> None:
    # given the transactions page
    browser.open("/transactions")
    browser.wait_text(deliveries["done"])
    browser.screenshot("transactions")

    # when the operator searches a completed delivery by its id and opens it
    box = browser.css("input[name=q]")
    box.send_keys(deliveries["done"])
    box.submit()
    browser.wait(lambda: len(browser.all("#live table.grid tbody tr")) == 1, "one result")
    browser.click(f"#live a[href='/transactions/{deliveries['done']}']")

    # then its history shows both parts of the join, the join timer with the due time the
    # service set (300 s, although the console's own declarations say 10 s), and the end
    browser.wait_text("DeliveryCompleted")
    text = browser.text()
    assert text.count("join part") == 2, text
    assert "timer set" in text and "delivery.join:schedule_delivery" in text
    assert f"({SERVICE_JOIN_TIMEOUT / 60:.1f}m later)" in text, text
    assert "timer cancelled" in text
    # and the graph draws the path it took
    taken = set(browser.attrs("svg.graph g.edge.taken", "data-from", "data-to"))
    assert ("PackageReady", "delivery") in taken and ("DroneScheduled", "delivery") in taken
    browser.screenshot("transaction-completed")

    # when the operator opens the rejected delivery
    browser.open(f"/transactions/{deliveries['heavy']}")
    browser.wait_text("DeliveryFailed")

    # then both compensations ran, and the join that never completed is shown
    text = browser.text()
    assert "package.release_package" in text and "drone-scheduler.release_drone" in text
    assert text.count("compensation") >= 2
    assert "failed" in browser.text_of(".summary")
    browser.screenshot("transaction-failed")


def test_search_by_data_field_status_and_sort(browser: Browser, deliveries: dict[str, str]) -> None:
    # when searching by a data field of the package event
    browser.open(f"/transactions?field=package_id%3Dp-{deliveries['heavy']}")
    # then only that delivery is listed
    browser.wait(lambda: len(browser.all("#live table.grid tbody tr")) == 1, "one result")
    assert deliveries["heavy"] in browser.text()

    # when listing failed ones only
    browser.open("/transactions?status=failed")
    browser.wait_text(deliveries["heavy"])
    assert deliveries["done"] not in browser.text_of("#live")

    # when sorting by the number of events, fewest first
    browser.open("/transactions?sort=events&dir=asc")
    browser.wait(lambda: browser.all("#live th a.sorted"), "a sorted column")
    counts = [int(text) for text in browser.cells("#live table.grid tbody tr", 5)]
    assert counts == sorted(counts) and len(counts) >= 4


def test_replay_a_dead_letter_and_see_its_transaction_complete(
    browser: Browser, system: LiveSystem, deliveries: dict[str, str]
) -> None:
    grounded = deliveries["grounded"]
    # given the grounded delivery is in flight with its landing dead-lettered
    assert system.outcome(grounded) is None
    browser.open(f"/transactions/{grounded}")
    browser.wait_text("Waiting for")
    # then its page says what it waits for, on the graph too
    assert "delivery.complete_delivery" in browser.text_of(".waiting-box")
    waiting = [name for (name,) in browser.attrs("svg.graph g.node.waiting", "data-name")]
    assert waiting == ["delivery"]
    browser.screenshot("transaction-waiting")
    browser.open("/dead-letters")
    browser.wait_text("DroneArrived")
    browser.screenshot("dead-letters")
    browser.click("#live a[href^='/dead-letters/']")
    browser.wait_text("flight computer lost the landing report")
    assert "Traceback" in browser.text() and "PermanentFailure" in browser.text()
    browser.screenshot("dead-letter")

    # when edited data that breaks the event's schema is checked
    browser.css("details.edit summary").click()
    area = browser.css("details.edit textarea")
    area.clear()
    area.send_keys('{"delivery_id": "' + grounded + '"}')
    browser.css("details.edit button").click()
    # then nothing is sent, and the page says why
    browser.wait_text("Not sent")
    assert "drone_id" in browser.text()
    assert len(system.dead_letters()) == 1

    # when the fault is repaired and the operator replays the letter as is, confirming it
    system.faults.grounded.clear()
    browser.css("a.button[href$='/replay']").click()
    browser.wait_text("Confirm replay")
    browser.screenshot("confirm-replay")
    browser.css("button[name=confirm]").click()

    # then the browser lands on the delivery's page, which completes by itself
    browser.wait(lambda: f"/transactions/{grounded}" in browser.driver.current_url, "redirect")
    browser.driver.execute_script("window.__sameDocument = true")
    browser.wait(lambda: "completed" in browser.text_of(".summary"), "completion", 60)
    assert browser.driver.execute_script("return window.__sameDocument") is True
    text = browser.text()
    assert "console replay" in text and "DeliveryCompleted" in text
    assert system.outcome(grounded) == "completed"
    assert not system.dead_letters()
    browser.screenshot("transaction-replayed")


def test_pages_update_live(
    browser: Browser, system: LiveSystem, deliveries: dict[str, str]
) -> None:
    # given the overview, open in the browser
    browser.open("/")
    browser.wait(lambda: browser.text_of(".card.total .n"), "the counts")
    before = int(browser.text_of(".card.total .n").replace(",", ""))
    browser.driver.execute_script("window.__sameDocument = true")

    # when three more deliveries are requested
    for _ in range(3):
        system.submit(_id("live"))

    # then the count grows on the same page, without a reload
    browser.wait(
        lambda: int(browser.text_of(".card.total .n").replace(",", "")) >= before + 3,
        "the overview to count the new deliveries",
    )
    assert browser.driver.execute_script("return window.__sameDocument") is True
    assert "delivery" in browser.text_of("#live table.grid")
    browser.screenshot("overview")


def test_the_choreography_page_counts_each_edge(
    browser: Browser, deliveries: dict[str, str]
) -> None:
    browser.open("/choreography")
    browser.wait(lambda: browser.all("svg.graph text.count"), "edge counts")
    counted = set(browser.attrs("svg.graph g.edge-count", "data-from", "data-to"))
    drawn = set(browser.attrs("svg.graph g.edge", "data-from", "data-to"))
    assert counted <= drawn  # each count names an edge of the graph
    assert ("DeliveryRequested", "package") in counted
    assert ("delivery", "DeliveryCompleted") in counted
    browser.screenshot("choreography")


# security ----------------------------------------------------------------------------------------


def test_a_token_protects_every_page_and_signs_in_once(
    system: LiveSystem, deliveries: dict[str, str], tmp_path: Path
) -> None:
    # given a console with a token (from the environment)
    console = ConsoleProcess(system, env={"CHOREOGRAPH_CONSOLE_TOKEN": TOKEN})
    console.wait_ready()
    browser = Browser(tmp_path / "profile", console.base_url)
    try:
        # when a visitor opens a transaction without signing in, then they are sent to sign in
        browser.open(f"/transactions/{deliveries['done']}")
        browser.wait_text("Console token")
        assert "/login" in browser.driver.current_url
        assert httpx.get(console.base_url + "/api/transactions").status_code == 401
        browser.screenshot("sign-in")

        # when they give a wrong token, then they stay out
        browser.css("input[name=token]").send_keys("not-the-token-at-all")
        browser.css("form.login button").click()
        browser.wait_text("That token is not the console's.")

        # when they give the right one, then they reach the page they asked for
        browser.css("input[name=token]").send_keys(TOKEN)
        browser.css("form.login button").click()
        browser.wait_text("DeliveryCompleted")
        assert f"/transactions/{deliveries['done']}" in browser.driver.current_url
        # and the token never appears on a page, nor the bus URL's credentials
        assert TOKEN not in browser.driver.page_source
        # and scripts may use the token as a bearer
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(console.base_url + "/api/transactions", headers=headers).is_success
    finally:
        browser.quit()
        console.stop()


def test_an_action_without_the_csrf_token_is_refused(
    browser: Browser, system: LiveSystem, console: ConsoleProcess
) -> None:
    # given a dead letter
    victim = _id("csrf")
    system.faults.grounded.add(victim)
    system.submit(victim)
    letter = system.wait(
        lambda: next((x for x in system.dead_letters() if victim.encode() in x.message.body),
                     None), "the dead letter")  # fmt: skip

    # when a page posts a discard without the CSRF token (a forged cross-site form)
    browser.open(f"/dead-letters/{letter.id}")
    browser.wait_text("Discard")
    browser.driver.execute_script(
        "var f = document.createElement('form'); f.method = 'post';"
        f"f.action = '/dead-letters/{letter.id}/discard'; document.body.appendChild(f);"
        "f.submit();"
    )
    # then it is refused and the letter is still there
    browser.wait_text("This action needs the page's CSRF token")
    assert any(x.id == letter.id for x in system.dead_letters())
    # and so is a request with no session at all
    refused = httpx.post(f"{console.base_url}/dead-letters/{letter.id}/discard",
                         data={"confirm": "yes"})  # fmt: skip
    assert refused.status_code == 403

    # when the operator discards it through the confirmation page, then it is gone
    browser.open(f"/dead-letters/{letter.id}/discard")
    browser.css("button[name=confirm]").click()
    browser.wait_text("The dead letter was discarded.")
    assert not any(x.id == letter.id for x in system.dead_letters())
    system.faults.grounded.discard(victim)


def test_read_only_hides_and_refuses_replay_and_discard(system: LiveSystem, tmp_path: Path) -> None:
    # given a dead letter and a read-only console
    victim = _id("ro")
    system.faults.grounded.add(victim)
    system.submit(victim)
    letter = system.wait(
        lambda: next((x for x in system.dead_letters() if victim.encode() in x.message.body),
                     None), "the dead letter")  # fmt: skip
    console = ConsoleProcess(system, "--read-only")
    console.wait_ready()
    browser = Browser(tmp_path / "profile", console.base_url)
    try:
        # when the letter is opened, then there is no replay or discard
        browser.open(f"/dead-letters/{letter.id}")
        browser.wait_text("read-only console")
        assert not browser.all("a.button")
        # and the confirmation page itself is refused
        browser.open(f"/dead-letters/{letter.id}/replay")
        browser.wait_text("This console is read-only")
    finally:
        browser.quit()
        console.stop()
    system.faults.grounded.discard(victim)
