"""widget.js in Chromium, on a customer-like page (strict CSP, careless site CSS), against the real API.

Each test leaves a screenshot of its page in build/test-artifacts/widget/ and fails on any CSP
violation or uncaught error in the page (tests/browser/conftest.py).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.async_api import Page, expect

from shared.gateway import ESCALATE
from tests.browser.conftest import Stack, Widget
from tests.fakes.openai_server import ScriptedReply

pytestmark = pytest.mark.xdist_group("browser")

TAG = "hiredhands-chat"
FOLLOW_UP = "The team will follow up with you here."
UNAVAILABLE = "Chat is not available on this website right now."

SHADOW = f"document.querySelector('{TAG}').shadowRoot"


def launcher(page: Page) -> Any:
    return page.get_by_role("button", name="Open chat")


def message_box(page: Page) -> Any:
    return page.get_by_role("textbox", name="Message")


def replies(page: Page) -> Any:
    return page.locator(f"{TAG} .msg.a")


def notes(page: Page) -> Any:
    return page.locator(f"{TAG} .msg.n")


async def ask(page: Page, text: str) -> None:
    await message_box(page).fill(text)
    await message_box(page).press("Enter")


async def turn_over(page: Page) -> None:
    """Wait for the reply's end (the stream's ``done``, or the JSON answer): the send button is enabled."""
    await expect(page.locator(f"{TAG} form button")).to_have_attribute("aria-disabled", "false")


async def freeze_clock(page: Page) -> None:
    """Stop the page's clock (installed with ``page.clock.install()``): from here its timers fire only
    when the test advances it, however long the test itself takes."""
    await page.clock.pause_at(await page.evaluate("Date.now()") + 1000)


async def open_widget(page: Page, url: str) -> None:
    await page.goto(url)
    await launcher(page).click()


def chat_posts(page: Page, stack: Stack) -> list[str]:
    return [url for url in page.observed.requests if stack.chat_url_pattern.match(url)]


def contrast(foreground: str, background: str) -> float:
    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", css)[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


class TestConversation:
    async def test_open_greeting_ask_answer_and_a_reload_continues_the_conversation(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(content="We open at nine. Hours: https://harbour.example/hours.")
        page = await open_page(reduced_motion="no-preference")
        await open_widget(page, stack.site_url)

        await expect(page.get_by_role("dialog", name=widget.display_name)).to_be_visible()
        await expect(replies(page).first).to_contain_text(widget.greeting)
        await expect(message_box(page)).to_be_focused()
        await ask(page, "When do you open?")
        await expect(replies(page).nth(1)).to_contain_text("We open at nine.")
        link = replies(page).nth(1).locator("a")
        await expect(link).to_have_attribute("href", "https://harbour.example/hours")
        await expect(link).to_have_attribute("rel", "noopener noreferrer")
        await expect(link).to_have_attribute("target", "_blank")
        await turn_over(page)
        await page.snap("answered")

        await page.reload()
        await launcher(page).click()
        await expect(page.locator(f"{TAG} .msg.v")).to_contain_text("When do you open?")
        await expect(replies(page).nth(1)).to_contain_text("We open at nine.")
        await page.snap("reloaded")
        stack.fake.reply = ScriptedReply(content="Saturdays too, from ten.")
        await ask(page, "And on Saturdays?")
        await expect(replies(page).nth(2)).to_contain_text("Saturdays too")
        await turn_over(page)

        stored = stack.sql(
            "select count(*), count(distinct m.conversation_id) from public.messages m"
            " join public.conversations c on c.id = m.conversation_id where c.agent_id = %(agent)s",
            {"agent": widget.agent_id},
        )
        assert stored == [(4, 1)], "the reloaded page did not continue the same conversation"
        history = stack.fake.requests_to("/v1/chat/completions")[-1].body["messages"]
        assert any("When do you open?" in str(m.get("content")) for m in history)

    async def test_starting_a_new_conversation_forgets_the_old_one_on_this_device(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(content="Noted.")
        page = await open_widget_page(page_opener=open_page, url=stack.site_url)
        assert await page.evaluate("localStorage.length") == 0, "something was stored before the first message"
        await ask(page, "My order is late")
        await expect(replies(page).nth(1)).to_contain_text("Noted.")
        await turn_over(page)
        assert await page.evaluate("localStorage.length") == 1

        await page.get_by_role("button", name="Start a new conversation").click()
        assert await page.evaluate("localStorage.length") == 0
        await expect(replies(page)).to_have_count(1)  # the greeting alone
        await expect(page.locator(f"{TAG} .msg.v")).to_have_count(0)
        await ask(page, "A new question")
        await expect(replies(page).nth(1)).to_contain_text("Noted.")
        await turn_over(page)
        conversations = stack.sql(
            "select count(*) from public.conversations where agent_id = %(agent)s", {"agent": widget.agent_id}
        )
        assert conversations == [(2,)]

    async def test_the_theme_passes_wcag_aa_and_the_sites_css_does_not_reach_the_widget(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(content="Sure.")
        page = await open_page(reduced_motion="no-preference")
        await open_widget(page, stack.site_url)
        await ask(page, "Hello")
        await expect(replies(page).nth(1)).to_contain_text("Sure.")
        colours = await page.evaluate(
            f"""() => Object.fromEntries(['header', '.launcher', '.msg.v', '.msg.a', 'form button', '.a a, .msg.a']
                .map((s) => {{ const st = getComputedStyle({SHADOW}.querySelector(s));
                               return [s, [st.color, st.backgroundColor]]; }}))"""
        )
        for selector, (foreground, background) in colours.items():
            assert contrast(foreground, background) >= 4.5, f"{selector}: {foreground} on {background}"
        # The theme's accent (#0a7) is used; white on it would fail AA, so the text is black.
        assert colours["header"] == ["rgb(0, 0, 0)", "rgb(0, 170, 119)"]
        # The site styles every button hotpink and hides every form and textarea: not ours.
        assert colours[".launcher"][1] == "rgb(0, 170, 119)"
        await expect(message_box(page)).to_be_visible()
        assert await page.evaluate(f"getComputedStyle({SHADOW}.querySelector('.panel')).animationName") == "rise"


# At every animation frame (just before it is painted), the length of the reply being written.
SAMPLE_FRAMES = f"""() => {{
  window.__frames = [];
  const root = {SHADOW};
  const tick = () => {{
    const replies = root.querySelectorAll('.msg.a');
    const body = replies.length > 1 ? replies[replies.length - 1].lastElementChild : null;
    window.__frames.push(body && !body.querySelector('.typing') ? body.textContent.length : 0);
    requestAnimationFrame(tick);
  }};
  requestAnimationFrame(tick);
}}"""


class TestProgressiveAnswer:
    async def test_the_answer_appears_progressively(self, stack: Stack, widget: Widget, open_page: Any) -> None:
        answer = "One two three four five six seven eight nine ten."
        stack.fake.reply = ScriptedReply(content=answer)
        stack.fake.token_interval_seconds = 0.08
        page = await open_widget_page(page_opener=open_page, url=stack.site_url)
        await expect(replies(page).first).to_contain_text(widget.greeting)
        content_types: list[str] = []
        page.on(
            "response",
            lambda r: (
                content_types.append(r.headers.get("content-type", ""))
                if r.request.method == "POST" and stack.chat_url_pattern.match(r.url)
                else None
            ),
        )
        await page.evaluate(SAMPLE_FRAMES)
        await ask(page, "Count to ten")
        await expect(replies(page).nth(1)).to_contain_text("three")
        await page.snap("streaming")
        await expect(replies(page).nth(1)).to_contain_text(answer)

        assert content_types, "no chat answer was seen"
        assert content_types[-1].startswith("text/event-stream"), f"the answer was not streamed: {content_types}"
        painted = await page.evaluate("window.__frames")
        partial = sorted({length for length in painted if 0 < length < len(answer)})
        assert len(partial) >= 2, f"the reply was painted {len(partial)} times before its end: {partial}"


class TestJsonAnswer:
    async def test_a_json_answer_works_as_well_and_continues_the_conversation(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        # As if a proxy dropped the widget's Accept header: the real API then answers JSON.
        async def accept_json_only(route: Any) -> None:
            await route.continue_(headers={**route.request.headers, "accept": "application/json"})

        page = await open_page()
        await page.route(stack.chat_url_pattern, accept_json_only)
        content_types: list[str] = []
        page.on(
            "response",
            lambda r: (
                content_types.append(r.headers.get("content-type", ""))
                if r.request.method == "POST" and stack.chat_url_pattern.match(r.url)
                else None
            ),
        )
        stack.fake.reply = ScriptedReply(content="A whole answer at once.")
        await open_widget(page, stack.site_url)
        await ask(page, "Hello")
        await expect(replies(page).nth(1)).to_contain_text("A whole answer at once.")
        stack.fake.reply = ScriptedReply(content="And another.")
        await ask(page, "Again")
        await expect(replies(page).nth(2)).to_contain_text("And another.")
        await turn_over(page)
        assert content_types == ["application/json", "application/json"]
        stored = stack.sql(
            "select count(distinct conversation_id) from public.conversations c"
            " join public.messages m on m.conversation_id = c.id where c.agent_id = %(agent)s",
            {"agent": widget.agent_id},
        )
        assert stored == [(1,)]


class TestHandOver:
    async def test_asking_for_a_person_says_the_team_will_follow_up(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(
            content=None,
            tool_calls=[
                (ESCALATE, {"reason": "visitor_requested_human", "summary": "asks for a person", "draft_reply": ""})
            ],
        )
        page = await open_widget_page(page_opener=open_page, url=stack.site_url)
        await ask(page, "Can I talk to a person, please?")
        await expect(notes(page).last).to_have_text(FOLLOW_UP)
        await expect(page.locator(f"{TAG} [aria-live=polite]")).to_have_text(FOLLOW_UP)
        await turn_over(page)
        escalations = stack.sql(
            "select count(*) from public.review_items where agent_id = %(agent)s and kind = 'escalation'",
            {"agent": widget.agent_id},
        )
        assert escalations == [(1,)]


async def open_widget_page(*, page_opener: Any, url: str, **options: Any) -> Page:
    page: Page = await page_opener(**options)
    await open_widget(page, url)
    return page


class TestRefusedOrigin:
    async def test_a_website_not_allowed_shows_unavailable_and_learns_nothing_about_the_agent(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        page = await open_page()
        failed: list[str] = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        await open_widget(page, stack.refused_url)

        await expect(notes(page)).to_have_text(UNAVAILABLE)
        await expect(message_box(page)).to_be_disabled()
        # Refused without CORS headers: the page's script cannot read even the refusal.
        assert [url.rsplit("/", 1)[-1] for url in failed] == ["config"]
        seen = " ".join(
            [
                await page.content(),
                await page.evaluate(f"{SHADOW}.textContent"),
                await page.evaluate("JSON.stringify(localStorage)"),
                *page.observed.console,
            ]
        )
        for secret in (widget.display_name, "Ahoy", "#0a7", str(widget.agent_id), str(widget.org_id)):
            assert secret not in seen, f"{secret!r} reached a page the agent does not allow"
        assert stack.fake.requests == []


class TestModelOutputIsText:
    async def test_an_xss_shaped_reply_is_inert(self, stack: Stack, widget: Widget, open_page: Any) -> None:
        probe = f"http://localhost:{stack.refused_port}/injected"
        stack.fake.reply = ScriptedReply(
            content=(
                f'<img src="{probe}.png" onerror="window.__pwned=1">'
                "<script>window.__pwned=2</script>"
                '<a href="javascript:window.__pwned=3">click</a> '
                "[or here](javascript:window.__pwned=4) "
                f'<iframe src="{probe}.html"></iframe> '
                "<svg onload=alert(5)> javascript:alert(6) "
                "Safe: https://harbour.example/a?b=1."
            )
        )
        page = await open_widget_page(page_opener=open_page, url=stack.site_url)
        await ask(page, "Show me something")
        await expect(replies(page).nth(1)).to_contain_text("Safe:")
        await page.wait_for_timeout(300)

        assert await page.evaluate("window.__pwned") is None, "a script in the reply ran"
        assert page.observed.dialogs == []
        assert not [url for url in page.observed.requests if url.startswith(probe)]
        assert (
            await page.evaluate(f"{SHADOW}.querySelectorAll('img, script, iframe, svg:not([aria-hidden])').length") == 0
        )
        links = await page.evaluate(f"[...{SHADOW}.querySelectorAll('.log a')].map((a) => [a.href, a.rel, a.target])")
        # Every URL in the text is a link, opening in a new context without an opener or referrer;
        # nothing else is: no javascript: link survives.
        assert ["https://harbour.example/a?b=1", "noopener noreferrer", "_blank"] in links
        for href, rel, target in links:
            assert href.startswith(("https://", "http://")), href
            assert (rel, target) == ("noopener noreferrer", "_blank")
        await expect(replies(page).nth(1)).to_contain_text('<img src="')
        await expect(replies(page).nth(1)).to_contain_text("javascript:window.__pwned=3")


FOCUSED = f"""() => {{
  const root = {SHADOW};
  if (document.activeElement !== root.host) return 'page:' + document.activeElement.tagName;
  const active = root.activeElement;
  const where = root.querySelector('.panel').contains(active) ? 'panel:' : 'widget:';
  return where + (active.id || active.className || active.tagName);
}}"""


class TestKeyboard:
    async def test_keyboard_only_use_keeps_focus_in_the_panel_and_returns_it(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(content="Hello there, see https://harbour.example/help")
        page = await open_page()
        await page.goto(stack.site_url)
        for _ in range(6):
            await page.keyboard.press("Tab")
            if await page.evaluate(FOCUSED) == "widget:launcher":
                break
        assert await page.evaluate(FOCUSED) == "widget:launcher", "the launcher is not reachable with Tab"

        await page.keyboard.press("Enter")
        await expect(message_box(page)).to_be_focused()
        await page.keyboard.type("Hi")
        await page.keyboard.press("Enter")
        await expect(replies(page).nth(1)).to_contain_text("Hello there")

        for key in ["Tab"] * 7 + ["Shift+Tab"] * 7:
            await page.keyboard.press(key)
            where = await page.evaluate(FOCUSED)
            assert where.startswith("panel:"), f"{key} moved the focus out of the open panel, to {where}"
        await page.keyboard.press("Escape")
        await expect(page.get_by_role("dialog")).to_be_hidden()
        assert await page.evaluate(FOCUSED) == "widget:launcher", "closing did not return the focus to the launcher"


class TestMobile:
    async def test_a_small_viewport_gets_a_full_screen_panel_without_motion(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.fake.reply = ScriptedReply(content="Hi from your phone.")
        page = await open_widget_page(
            page_opener=open_page,
            url=stack.site_url,
            viewport={"width": 375, "height": 667},
            is_mobile=True,
            has_touch=True,
            reduced_motion="reduce",
        )
        await ask(page, "Hello")
        await expect(replies(page).nth(1)).to_contain_text("Hi from your phone.")
        box = await page.get_by_role("dialog").bounding_box()
        assert box == {"x": 0, "y": 0, "width": 375, "height": 667}
        await expect(launcher(page)).to_be_hidden()
        assert await page.evaluate(f"getComputedStyle({SHADOW}.querySelector('.panel')).animationName") == "none"


class TestRefusals:
    async def test_rate_limited_is_a_friendly_message_and_the_retry_waits_for_retry_after(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.set_limits(widget.org_id, widget_rpm_per_visitor=1)
        stack.fake.reply = ScriptedReply(content="First answer.")
        page = await open_page()
        await page.clock.install()
        statuses: list[Any] = []
        page.on("response", lambda r: statuses.append(r) if stack.chat_url_pattern.match(r.url) else None)
        await open_widget(page, stack.site_url)
        await ask(page, "One")
        await expect(replies(page).nth(1)).to_contain_text("First answer.")
        await turn_over(page)
        await freeze_clock(page)
        await ask(page, "Two")
        await expect(notes(page).last).to_contain_text("You're sending messages a little fast.")
        refused = statuses[-1]
        assert refused.status == 429
        wait = max(int(refused.headers["retry-after"]), 2)  # the widget's first backoff step is 2 s
        await expect(notes(page).last).to_contain_text(f"in {wait} seconds" if wait < 90 else "minute")
        assert "faster than I can answer" not in await page.evaluate(f"{SHADOW}.textContent")
        await page.snap("friendly-message")

        stack.set_limits(widget.org_id, widget_rpm_per_visitor=100)
        stack.fake.reply = ScriptedReply(content="Second answer.")
        await self._retries_only_after(page, stack, wait, expected="Second answer.")

    async def test_budget_exhausted_is_a_friendly_message_and_the_retry_waits_for_retry_after(
        self, stack: Stack, widget: Widget, open_page: Any
    ) -> None:
        stack.set_limits(widget.org_id, monthly_budget_microusd=1)
        page = await open_page()
        await page.clock.install()
        statuses: list[Any] = []
        page.on("response", lambda r: statuses.append(r) if stack.chat_url_pattern.match(r.url) else None)
        await open_widget(page, stack.site_url)
        await freeze_clock(page)
        await ask(page, "Are you there?")
        await expect(notes(page).last).to_have_text("Sorry, I can't answer right now. I'll try again in 5 minutes.")
        assert statuses[-1].status == 503
        assert statuses[-1].headers["retry-after"] == "300"
        await page.snap("friendly-message")
        assert stack.fake.requests == []

        stack.set_limits(widget.org_id, monthly_budget_microusd=5000000)
        stack.fake.reply = ScriptedReply(content="Back again.")
        await self._retries_only_after(page, stack, 300, expected="Back again.")

    @staticmethod
    async def _retries_only_after(page: Page, stack: Stack, seconds: int, *, expected: str) -> None:
        sent = len(chat_posts(page, stack))
        await page.clock.fast_forward((seconds - 1) * 1000)
        await page.wait_for_timeout(300)
        assert len(chat_posts(page, stack)) == sent, "the widget sent again before Retry-After"
        await page.clock.fast_forward(1500)
        await expect(replies(page).last).to_contain_text(expected)
        assert len(chat_posts(page, stack)) == sent + 1
