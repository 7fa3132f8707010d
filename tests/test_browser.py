"""The status page in a real browser: Debian's chromium, headless, against a running sidecar.

Two views, as a person would meet them:
- a passer-by: ``chromium --dump-dom`` and ``--screenshot`` of ``/`` (plain CLI) show the
  failing checker and its count, and no entity;
- an operator who signs in: chromium driven through its DevTools protocol over
  ``--remote-debugging-pipe`` (no extra package, no port) opens ``/login``, types the
  token into the form and submits it, exactly as by hand; the page it lands on shows
  the planted violation's entity (a payment channel whose money does not add up). The status page has no ``?token=`` shortcut, so the
  login form is the only way in, and the test goes through it.
Screenshots are saved under ``artifacts/`` (git-ignored) as test artifacts.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from zsmon.testing import LOCAL_HTTP, running_service, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TOKEN = "browser-token-91c2"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (.ci/run installs it)")
pytestmark = [pytestmark, pytest.mark.slow]  # pytest -m 'not slow' leaves it out (README)


def plant_payment_fault(writer) -> str:
    """A consistent payment world made by the simulator, then money from nowhere on one channel."""
    from zsmon.demo.simulator.payments import PaymentSimulator, inject_fault

    PaymentSimulator(writer, seed=3).run(200)
    return inject_fault(writer, "money_from_nowhere")


def chromium_cli(*args: str, timeout: float = 60) -> str:
    with tempfile.TemporaryDirectory(prefix="zsmon-chromium-") as profile:
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                             text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended by NUL on fds 3/4."""

    def __init__(self, window: str = "1100,900") -> None:
        self.profile = tempfile.mkdtemp(prefix="zsmon-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, its fd 4 carries the answers
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             f"--window-size={window}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:  # events (no id) are not needed here
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def page(self, method: str, **params):
        return self.call(method, self.session, **params)

    def eval(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self._w)
            os.close(self._r)
            shutil.rmtree(self.profile, ignore_errors=True)



def _sign_in(browser, svc) -> None:
    """Sign in as an operator does: the login form, filled and submitted, back on the status page."""
    browser.page("Page.navigate", url=svc.url("api", "/login"))
    wait_for(lambda: browser.eval("document.readyState === 'complete' && !!document.getElementById('token')"))
    browser.eval(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                 "document.querySelector('#login form').submit(); true")
    wait_for(lambda: browser.eval("location.pathname === '/' && document.readyState === 'complete' "
                                  "&& document.body.innerText.includes('Sign out')"), timeout=15)

def test_status_page_in_chromium(make_config, writer):
    ARTIFACTS.mkdir(exist_ok=True)
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                      checkers={"payments": {"interval_seconds": 0.5}})
    channel = plant_payment_fault(writer)
    with running_service(cfg) as svc:
        url = svc.url("api", "/")
        wait_for(lambda: any(r.checker == "payments" and r.violation_counts.get("channel_conservation")
                             for r in svc.service.latest_results()), timeout=20)

        # A passer-by: the failing checker and its count, never the entity.
        dom = chromium_cli("--dump-dom", url)
        assert 'id="checker-payments"' in dom and '<span class="badge fail">fail</span>' in dom
        assert "channel_conservation</code>: 1" in dom
        assert channel not in dom and "Sign in for violation details" in dom
        shot = ARTIFACTS / "status-page-anonymous.png"
        shot.unlink(missing_ok=True)
        chromium_cli(f"--screenshot={shot}", "--window-size=1100,900", url)
        assert shot.stat().st_size > 5000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # An operator signs in through the form, on a phone-sized window.
        browser = DevTools(window="412,915")
        try:
            _sign_in(browser, svc)
            text = browser.eval("document.body.innerText")
            html = browser.eval("document.documentElement.outerHTML")
            assert f"channel {channel}" in text and "channel_conservation" in text
            assert f'<td data-label="entity" class="entity">channel <span class="entity-id">{channel}</span></td>' in html
            # The session cookie is HttpOnly: the page's scripts cannot read it.
            assert "zsmon_status" not in browser.eval("document.cookie")
            # Readable on a phone: nothing wider than the viewport but the scrollable violations table.
            assert browser.eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
            phone = ARTIFACTS / "status-page-signed-in-phone.png"
            browser.screenshot(phone)
            assert phone.stat().st_size > 5000
        finally:
            browser.close()
        assert browser.proc.returncode is not None


LAYOUT = """(() => {
  const box = el => el.getBoundingClientRect();
  const within = (el, outer) => box(el).left >= box(outer).left - 0.5 && box(el).right <= box(outer).right + 0.5;
  const one = sel => Array.from(document.querySelectorAll(sel)).map(el => ({
      text: el.textContent, lines: el.getClientRects().length,
      inside: within(el, el.closest('td, li')), right: box(el).right}));
  const scroll = Array.from(document.querySelectorAll('.scroll')).map(s => s.scrollWidth - s.clientWidth);
  const badges = Array.from(document.querySelectorAll('#state .badge')).map(b => ({
      cls: b.className, text: b.textContent, left: box(b).left, top: box(b).top, width: box(b).width}));
  const stale = Array.from(document.querySelectorAll('tr')).find(tr => tr.textContent.includes('stale_open_auction'));
  return {
    width: window.innerWidth, pageOverflow: document.documentElement.scrollWidth - window.innerWidth,
    entities: one('.entity-id'), invariants: one('code.invariant'), scroll, badges,
    staleLabels: stale ? Array.from(stale.querySelectorAll('.values .label')).map(l => l.textContent) : null,
    counts: Array.from(document.querySelectorAll('ul.counts li')).map(li => li.textContent.replace(/\\s+/g, ' ').trim()),
  };
})()"""


def test_status_page_layout_at_desktop_and_phone_widths(make_config, writer):
    """Boxes measured in Chromium: a UUID entity and every invariant name on one line inside their cells, the
    worst state first in the header, labelled values for a stale auction, nothing wider than a phone."""
    import re

    from zsmon.demo.simulator.auctions import AuctionSimulator

    ARTIFACTS.mkdir(exist_ok=True)
    channel = plant_payment_fault(writer)
    stuck = AuctionSimulator(writer, seed=7).run_until(auctions=20).inject_stuck_open_auction()
    assert re.fullmatch(r"[0-9a-f-]{36}", stuck), stuck  # a UUID: the widest entity id the page shows
    cfg = make_config(http={**LOCAL_HTTP, "admin_token": TOKEN}, scheduler={"health_interval_seconds": 0.5},
                      checkers={"payments": {"interval_seconds": 0.5}, "auctions": {"interval_seconds": 0.5}})
    with running_service(cfg) as svc:
        wait_for(lambda: {r.checker for r in svc.service.latest_results() if r.status == "fail"}
                 >= {"payments", "auctions"}, timeout=30)
        browser = DevTools(window="1280,900")
        try:
            _sign_in(browser, svc)
            for name, width, height, mobile in (("desktop", 1280, 900, False), ("phone", 390, 844, True)):
                browser.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                             mobile=mobile)
                browser.page("Page.reload")
                wait_for(lambda: browser.eval("document.readyState === 'complete' "
                                              "&& !!document.querySelector('.entity-id')"), timeout=15)
                m = browser.eval(LAYOUT)
                browser.screenshot(ARTIFACTS / f"status-page-layout-{name}.png")
                assert m["width"] == width, m["width"]
                assert m["pageOverflow"] <= 1, (name, m["pageOverflow"])
                ids = {e["text"]: e for e in m["entities"]}
                assert stuck in ids and channel in ids, ids
                for e in m["entities"] + m["invariants"]:
                    assert e["lines"] == 1, (name, e)          # never broken mid-word
                    assert e["inside"], (name, e)              # its cell is wide enough for it
                    assert e["right"] <= width, (name, e)      # visible without scrolling sideways
                if name == "desktop":
                    assert all(extra <= 1 for extra in m["scroll"]), m["scroll"]  # the table fits the page
                # The worst state first, and nothing reads as all good beside failing checkers.
                first = m["badges"][0]
                assert "fail" in first["cls"] and re.fullmatch(r"\d+ checkers failing", first["text"]), m["badges"]
                assert all(b["left"] >= first["left"] or b["top"] > first["top"] for b in m["badges"][1:])
                assert not any(b["cls"].split()[-1] == "ready" for b in m["badges"]), m["badges"]
                assert m["staleLabels"] == ["expected", "actual", "late by"], m["staleLabels"]
                assert any(c.startswith("stale_open_auction: 1 auction (") for c in m["counts"]), m["counts"]
        finally:
            browser.close()
