"""The chat page served at ``/`` (issue 25): its file server, and the page in a real headless Chromium
against real ``urial-edge serve`` processes.

The browser tests drive Debian's ``/usr/bin/chromium`` (or ``$URIAL_EDGE_CHROMIUM``) through Playwright,
whose own browser download is not needed. Without that browser they are skipped, unless ``CI`` is set:
then they fail.

Most servers here run "scripted" tiny llama models: every layer adds nothing to the residual stream
(``o_proj`` and ``down_proj`` are zero), so the logits at a position depend only on that position's
token, and the lm_head is set so that greedy decoding after the answer opening's last token ("\\n")
walks a chain of added tokens. The answer is then known exactly, with no mocking of the model or MLX.
"""

import http.client
import json
import os
import re
from pathlib import Path

import pytest

from conftest import TINY_PROMPT, open_stream, running_server, start_server, stop_server, wait_until
from urial_edge.serve import static

# Debian's chromium; URIAL_EDGE_CHROMIUM points at another Chromium or Chrome (e.g. a CI runner's own)
CHROMIUM = os.environ.get("URIAL_EDGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # generous: a loaded machine is slow, never wrong

# The scripted answers. No piece may occur in the prompt's text (the tokenizer would use it there), and
# the last one carries the closing fence, so the URIAL frame ends the answer there.
END = "\n```\n(end)"
GREETING = ["Hello", " from the", " scripted model.", "\n\n~~~python\nprint('hi')\n~~~\n\n", "Bye.", END]
GREETING_TEXT = "Hello from the scripted model.\n\n~~~python\nprint('hi')\n~~~\n\nBye."
PAYLOAD = ["<script>window.__xss=1</script>\n\n", '<img src=x onerror="window.__xss=2">\n\n',
           "[x](javascript:window.__xss=3)", END]
LOOP = ["lorem ipsum "]  # repeated until max_tokens


def scripted_model(path: Path, pieces, loop: bool = False, **config) -> Path:
    """A tiny llama whose greedy answer to any query is ``pieces`` joined (each one added token);
    with ``loop`` the last piece repeats until the token limit."""
    import mlx.core as mx
    import numpy as np

    from urial_edge.testing.tiny_models import TINY_CONFIGS, make_tiny_model

    vocab = TINY_CONFIGS["llama"]["vocab_size"]
    make_tiny_model(path, "llama", vocab_size=vocab + len(pieces), **config)
    spec = json.loads((path / "tokenizer.json").read_text())
    ids = list(range(vocab, vocab + len(pieces)))
    spec["added_tokens"] += [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": False} for i, p in zip(ids, pieces)]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    newline = spec["model"]["vocab"]["\u010a"]  # the byte-level symbol of "\n": every answer opening ends with it
    weights = {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[:] = 0  # attention and MLP add nothing: the logits depend on the current token only
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    chain = [newline] + ids + ([ids[-1]] if loop else [])
    for n, (source, target) in enumerate(zip(chain, chain[1:])):
        embed[source] = 0
        embed[source, n] = 1.0  # each source token gets a direction of its own...
        head[:, n] = 0
        head[target, n] = 100.0  # ...which only its successor's logit reads (far above any penalty)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    return path


def test_scripted_models_answer_exactly_their_script(tmp_path, monkeypatch):
    from urial_edge.runtime.assistant import Assistant

    monkeypatch.setenv("URIAL_EDGE_HOME", str(tmp_path / "home"))
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    for pieces, text in [(PAYLOAD, "".join(PAYLOAD[:-1]).strip()), (GREETING, GREETING_TEXT)]:
        model = scripted_model(tmp_path / f"m{len(pieces)}", pieces)
        answer = Assistant.load(str(model), str(prompt)).ask("hi")
        assert (answer.text, answer.finish_reason) == (text, "stop")
    looping = Assistant.load(str(scripted_model(tmp_path / "loop", LOOP, loop=True)), str(prompt), max_tokens=20)
    answer = looping.ask("hi")
    assert answer.text == ("lorem ipsum " * 20).strip() and answer.finish_reason == "length"


# -- the file server (no browser) ----------------------------------------------------------------

CSP_DIRECTIVES = ["default-src 'self'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data:",
                  "style-src 'self'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"]


@pytest.mark.parametrize("path,content_type", [
    ("/", "text/html; charset=utf-8"), ("/?q=1", "text/html; charset=utf-8"),
    ("/page/app.js", "text/javascript; charset=utf-8"), ("/page/app.css", "text/css; charset=utf-8"),
    ("/page/vendor/marked.umd.js", "text/javascript; charset=utf-8"),
    ("/page/vendor/purify.min.js", "text/javascript; charset=utf-8"), ("/page/icon.svg", "image/svg+xml"),
    ("/page/vendor/VERSIONS.md", "text/markdown; charset=utf-8"),
    ("/page/vendor/marked.LICENSE.txt", "text/plain; charset=utf-8"),
])
def test_page_files_are_served_with_their_type_and_a_strict_policy(path, content_type):
    status, headers, body = static.page_response(path)
    assert status == 200 and body and headers["Content-Type"] == content_type
    assert headers["Content-Length"] == str(len(body))
    assert all(d in headers["Content-Security-Policy"] for d in CSP_DIRECTIVES)
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize("path", [
    "/page/../server.py", "/page/%2e%2e/server.py", "/page/%2E%2E/%2E%2E/urial_edge/server.py",
    "/page/..%2fstatic.py", "/page/vendor/../../static.py", "/page/vendor/", "/page/vendor", "/page/",
    "/page//etc/passwd", "/page/..\\static.py", "/page/nope.js", "/page/static.py", "/page/app.js/",
    "/page/vendor/marked.umd.js.map", "/page/%61pp.js",
])
def test_nothing_outside_the_page_folder_listing_is_served(path):
    found = static.page_response(path)
    assert found is None or found[0] == 404
    if found is not None:
        assert b"import" not in found[2] and "Content-Security-Policy" in found[1]


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/chat/completions", "/pages/app.js", "/favicon.ico"])
def test_other_paths_are_left_to_the_api(path):
    assert static.page_response(path) is None


def test_vendored_files_match_versions_md():
    import hashlib

    vendor = static.PAGE_DIR / "vendor"
    table = dict(re.findall(r"^\| `([^`]+)` \|[^|]+\| `([0-9a-f]{64})` \|$", (vendor / "VERSIONS.md").read_text(), re.M))
    files = {p.name for p in vendor.iterdir() if p.name != "VERSIONS.md"}
    assert set(table) == files
    for name, digest in table.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name


def test_the_page_references_only_its_own_files():
    html = (static.PAGE_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/page/") and r[len("/page/"):] in static.listing() or r.startswith("#")
                        for r in refs)
    assert "<script>" not in html and " style=" not in html and "http" not in html.replace("http-equiv", "")


# -- servers and the browser ----------------------------------------------------------------------


def get(server, path, headers=None):
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=60)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def health(server) -> dict:
    return json.loads(get(server, "/health")[2])


def url(server, path="/"):
    return f"http://{server['host']}:{server['port']}{path}"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless; each test gets its own context (fresh storage)."""
    if not os.path.exists(CHROMIUM):
        reason = f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium, or set URIAL_EDGE_CHROMIUM)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the browser tests need playwright (pip install playwright; no browser download needed)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    with sync_playwright() as p:
        # launch() runs Chromium on a fresh temporary profile (user-data-dir) of its own
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser):
    """New pages, each in its own context; at the end no page may have thrown or broken its CSP."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    contexts, problems, dialogs = [], [], []

    def new_page(width=1280, height=800):
        context = browser.new_context(viewport={"width": width, "height": height}, color_scheme="light")
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text else None)
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.dialogs = dialogs
        return page

    yield new_page
    for context in contexts:
        context.close()
    assert not problems, problems
    assert not dialogs, dialogs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    return {"greeting": scripted_model(root / "greeting", GREETING),
            "payload": scripted_model(root / "payload", PAYLOAD),
            # long answers: a context large enough for 4096 tokens
            "loop": scripted_model(root / "loop", LOOP, loop=True, max_position_embeddings=8192)}


@pytest.fixture(scope="module")
def greeting(tmp_path_factory, models):
    with running_server(tmp_path_factory.mktemp("greeting-home"), models["greeting"]) as info:
        yield info


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, models):
    """One answer at a time and no queue: a second one gets 429."""
    with running_server(tmp_path_factory.mktemp("narrow-home"), models["loop"], "--max-batch", "1",
                        "--max-queue", "0") as info:
        yield info


def open_page(new_page, server, **size):
    from playwright.sync_api import expect

    page = new_page(**size)
    page.goto(url(server))
    expect(page.locator("#model-picker option")).not_to_have_count(0)  # /v1/models answered
    return page


def ask(page, text):
    page.locator("#composer-input").fill(text)
    page.locator("#composer-input").press("Enter")


def last_answer(page):
    return page.locator(".message.assistant").last


@pytest.mark.browser
def test_an_answer_streams_in_with_its_stats(new_page, greeting):
    from playwright.sync_api import expect

    page = open_page(new_page, greeting)
    composer = page.locator("#composer-input")
    expect(composer).to_be_focused()
    composer.type("What is")
    composer.press("Shift+Enter")  # a new line, not a send
    composer.type("a greeting?")
    expect(composer).to_have_value("What is\na greeting?")
    composer.press("Enter")
    expect(composer).to_have_value("")
    expect(page.locator(".message.user")).to_have_text("What is\na greeting?")
    answer = last_answer(page)
    expect(answer.locator(".message-body")).to_contain_text("Hello from the scripted model.")
    stats = answer.locator(".stats")
    expect(stats).to_contain_text("tokens/s")
    expect(stats).to_contain_text(re.compile(r"first token \d+\.\d\d s · \d+\.\d tokens/s · \d+ cached tokens"))
    expect(stats).not_to_contain_text("finish")
    expect(answer.locator(".message-body")).to_contain_text("Bye.")
    # a fenced block becomes a code block with a copy button
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    expect(answer.locator("pre code")).to_have_text("print('hi')")
    answer.locator(".copy-button").click()
    expect(answer.locator(".copy-button")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").strip() == "print('hi')"
    expect(page.locator("#conversation-title")).to_have_text("What is")
    expect(page.locator("#prompt-note")).to_contain_text("URIAL prompt")


@pytest.mark.browser
def test_a_conversation_continues_survives_a_reload_and_can_be_renamed_and_deleted(new_page, greeting):
    from playwright.sync_api import expect

    page = open_page(new_page, greeting)
    page.locator("#settings summary").click()
    page.locator("#system-text").fill("Answer briefly.")
    ask(page, "First question")
    expect(last_answer(page).locator(".stats")).to_contain_text("tokens/s")
    first_cached = int(re.search(r"(\d+) cached", last_answer(page).locator(".stats").inner_text()).group(1))
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "Second question")
    body = sent.value.post_data_json
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "First question"},
                                {"role": "assistant", "content": GREETING_TEXT},
                                {"role": "user", "content": "Second question"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and "max_tokens" not in body
    expect(page.locator(".message.assistant .stats")).to_have_count(2)
    second_cached = int(re.search(r"(\d+) cached", last_answer(page).locator(".stats").inner_text()).group(1))
    assert second_cached > first_cached  # the server resumed from the first turn's stored state

    page.reload()
    expect(page.locator(".message.user")).to_have_text(["First question", "Second question"])
    expect(page.locator(".message.assistant .message-body").first).to_contain_text("Hello from the scripted model.")
    expect(page.locator("#conversation-title")).to_have_text("First question")
    page.locator("#settings summary").click()
    expect(page.locator("#system-text")).to_have_value("Answer briefly.")

    page.get_by_role("button", name="Rename conversation: First question").click()
    field = page.get_by_role("textbox", name="New title")
    expect(field).to_be_focused()
    field.fill("Greetings")
    field.press("Enter")
    expect(page.locator(".conversation-open")).to_have_text(["Greetings"])
    expect(page.locator("#conversation-title")).to_have_text("Greetings")

    page.locator("#new-conversation").click()
    expect(page.locator(".conversation-open")).to_have_text(["New conversation", "Greetings"])
    expect(page.locator(".message")).to_have_count(0)
    page.locator(".conversation-open", has_text="Greetings").click()
    expect(page.locator(".message.user")).to_have_count(2)

    page.reload()
    expect(page.locator(".conversation-open")).to_have_text(["New conversation", "Greetings"])
    delete = page.get_by_role("button", name="Delete conversation: Greetings")
    delete.click()
    page.get_by_role("button", name="Really delete conversation: Greetings").click()  # asks once more
    expect(page.locator(".conversation-open")).to_have_text(["New conversation"])
    page.reload()
    expect(page.locator(".conversation-open")).to_have_text(["New conversation"])
    expect(page.locator(".message")).to_have_count(0)


@pytest.mark.browser
def test_model_output_cannot_inject_markup(new_page, tmp_path_factory, models):
    from playwright.sync_api import expect

    with running_server(tmp_path_factory.mktemp("payload-home"), models["payload"]) as server:
        page = open_page(new_page, server)
        ask(page, "Say something nasty.")
        answer = last_answer(page)
        expect(answer.locator(".stats")).to_contain_text("tokens/s")
        body = answer.locator(".message-body")
        # the markup is shown as the text the model wrote, not run
        expect(body).to_contain_text("<script>window.__xss=1</script>")
        expect(body).to_contain_text('<img src=x onerror="window.__xss=2">')
        expect(body.locator("a", has_text="x")).to_have_count(1)
        assert body.locator("script, img, iframe, [onerror], [onclick], a[href^='javascript']").count() == 0
        assert page.locator("script:not([src])").count() == 0
        assert page.evaluate("typeof window.__xss") == "undefined"
        body.locator("a").click()  # a link without its javascript: URL does nothing
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert not page.dialogs


def idle(server):
    h = health(server)
    return h if h["active"] == 0 and h["waiting"] == 0 else None


@pytest.mark.browser
def test_stop_button_and_escape_cancel_the_answer_on_the_server(new_page, narrow):
    from playwright.sync_api import expect

    page = open_page(new_page, narrow)
    page.locator("#settings summary").click()
    page.locator("#max-tokens").fill("4096")  # thousands of tokens: far longer than the test takes
    for how in ("button", "escape"):
        wait_until(lambda: idle(narrow), what="an idle server")
        before = health(narrow)["finished"]["cancelled"]
        ask(page, f"Go on ({how}).")
        answer = last_answer(page)
        expect(answer.locator(".message-body")).to_contain_text("lorem ipsum")
        expect(page.locator("#send-button")).to_be_hidden()
        if how == "button":
            page.locator("#stop-button").click()
        else:
            page.keyboard.press("Escape")
        expect(answer.locator(".stats")).to_contain_text("stopped")
        expect(page.locator("#stop-button")).to_be_hidden()
        expect(page.locator("#send-button")).to_be_visible()
        expect(page.locator("#composer-input")).to_be_focused()
        wait_until(lambda: health(narrow)["finished"]["cancelled"] == before + 1, what="the cancellation")
    # the stopped answers stay in the conversation and a reload keeps them as they were
    page.reload()
    expect(page.locator(".message.assistant .stats")).to_have_text([re.compile("stopped")] * 2)


@pytest.mark.browser
def test_server_errors_show_in_the_conversation_and_the_composer_recovers(new_page, narrow):
    from playwright.sync_api import expect

    wait_until(lambda: idle(narrow), what="an idle server")
    page = open_page(new_page, narrow)
    long = open_stream(narrow, {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 4096,
                                 "stream": True})  # the only slot is taken and nothing may wait: 429
    try:
        ask(page, "Are you busy?")
        error = page.locator(".message.error")
        expect(error).to_contain_text(re.compile(r"The server is busy; try again in \d+ s\. \(busy: .*\)"))
        expect(page.locator(".message.assistant")).to_have_count(0)
        expect(page.locator("#send-button")).to_be_visible()
        expect(page.locator("#composer-input")).to_have_value("Are you busy?")  # offered again
    finally:
        long.close()
    wait_until(lambda: idle(narrow), what="the other client's answer to be cancelled")
    page.locator("#composer-input").press("Enter")  # the same question again: now it is answered
    expect(last_answer(page).locator(".stats")).to_contain_text("cut at the token limit")  # 512 tokens by default
    # a request the server refuses (400, OpenAI-style body)
    page.locator("#settings summary").click()
    page.locator("#max-tokens").fill("99999")
    ask(page, "Too long?")
    expect(page.locator(".message.error").last).to_contain_text("The server answered 400: 'max_tokens' must be")
    page.locator("#max-tokens").fill("5")
    page.locator("#composer-input").press("Enter")
    expect(last_answer(page).locator(".stats")).to_contain_text("cut at the token limit")
    # the failed questions are not sent again
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "Last one")
    users = [m["content"] for m in sent.value.post_data_json["messages"] if m["role"] == "user"]
    assert users == ["Are you busy?", "Too long?", "Last one"]
    expect(page.locator(".message.assistant .stats")).to_have_count(3)


@pytest.mark.browser
def test_a_server_that_went_away_is_reported(new_page, tmp_path, models):
    from playwright.sync_api import expect

    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny.toml").write_text(TINY_PROMPT)
    proc, host, port = start_server(home, models["greeting"], home / "tiny.toml")
    server = {"host": host, "port": port}
    try:
        page = open_page(new_page, server)
    finally:
        assert "Traceback" not in stop_server(proc)
    ask(page, "Anyone there?")
    expect(page.locator(".message.error")).to_contain_text("Cannot reach the server")
    expect(page.locator("#send-button")).to_be_visible()
    expect(page.locator("#composer-input")).to_have_value("Anyone there?")


@pytest.mark.browser
def test_api_key_is_asked_once_per_tab(new_page, tmp_path_factory, models):
    from playwright.sync_api import expect

    with running_server(tmp_path_factory.mktemp("key-home"), models["greeting"], "--api-key", "s3cret") as server:
        # the page and its files load without a key, with their policy; the API does not; nothing else leaks
        status, headers, body = get(server, "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8" and b"app.js" in body
        assert headers["Content-Security-Policy"] == static.CSP and headers["X-Content-Type-Options"] == "nosniff"
        assert get(server, "/page/vendor/purify.min.js")[0] == 200
        assert get(server, "/v1/models")[0] == 401
        for path in ("/page/../server.py", "/page/%2e%2e/server.py", "/page/vendor/"):
            assert get(server, path)[0] == 404
        page = new_page()
        page.goto(url(server))
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#key-input")).to_be_focused()
        page.locator("#key-input").fill("wrong")
        page.locator("#key-input").press("Enter")
        expect(page.locator("#key-message")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.locator("#key-input").fill("s3cret")
        page.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#model-picker option").first).to_have_text(models["greeting"].name)
        ask(page, "Hello?")
        expect(last_answer(page).locator(".stats")).to_contain_text("tokens/s")
        assert page.evaluate("sessionStorage.getItem('urial-edge.api-key')") == "s3cret"
        page.reload()
        expect(page.locator("#model-picker option").first).to_have_text(models["greeting"].name)
        expect(dialog).to_be_hidden()
        ask(page, "Again?")
        expect(page.locator(".message.assistant .stats")).to_have_count(2)
        expect(dialog).to_be_hidden()


@pytest.mark.browser
def test_phone_width(new_page, greeting):
    from playwright.sync_api import expect

    page = open_page(new_page, greeting, width=360, height=740)
    toggle = page.locator("#sidebar-toggle")
    expect(toggle).to_be_visible()
    expect(page.locator("#sidebar")).to_be_hidden()
    expect(page.locator("#composer-input")).to_be_visible()
    expect(page.locator("#send-button")).to_be_in_viewport()
    ask(page, "Hi from a phone")
    expect(last_answer(page).locator(".stats")).to_contain_text("tokens/s")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the screen
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#new-conversation")).to_be_in_viewport()
    page.locator("#new-conversation").click()  # picking from the list closes it again
    expect(page.locator("#sidebar")).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(page.locator("#composer-input")).to_be_focused()
    toggle.click()
    expect(page.locator(".conversation-open")).to_have_count(2)
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()


# The /v1/models shape of the multi-model server: the page picks a model and a prompt from it
# and names them in the request.
def contract(model_id):
    prompts = ["urial-k0", "urial-k1", "urial-k3", "urial-k4-direct", "urial-k8"]

    def entry(prompt, loaded=True, name=model_id):
        return {"id": name if prompt is None else f"{name}:{prompt}", "object": "model", "owned_by": "urial-edge",
                "urial": {"model": name, "prompt": prompt, "prompts": prompts, "default_prompt": "urial-k4-direct",
                          "loaded": loaded}}

    return {"object": "list", "data": [entry(None), *(entry(p) for p in prompts), entry(None, False, "other-model")]}


@pytest.mark.browser
def test_model_and_prompt_pickers_follow_the_multi_model_contract(new_page, greeting):
    from playwright.sync_api import expect

    page = new_page()
    model_id = greeting["model"].name
    page.route("**/v1/models", lambda route: route.fulfill(json=contract(model_id)))
    page.goto(url(greeting))
    expect(page.locator("#model-picker option")).to_have_text([model_id, "other-model (loads when used)"])
    expect(page.locator("#prompt-picker option")).to_have_count(5)
    expect(page.locator("#prompt-picker")).to_have_value("urial-k4-direct")
    expect(page.locator("#prompt-note")).to_contain_text("urial-k4-direct")
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "Default prompt")
    assert sent.value.post_data_json["model"] == model_id
    expect(last_answer(page).locator(".stats")).to_contain_text(f"{model_id} · urial-k4-direct · first token")
    page.locator("#prompt-picker").select_option("urial-k0")  # (the longer prompts do not fit the tiny model)
    expect(page.locator("#prompt-note")).to_contain_text("urial-k0")
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "No examples")
    assert sent.value.post_data_json["model"] == f"{model_id}:urial-k0"
    expect(last_answer(page).locator(".stats")).to_contain_text("urial-k0 · first token")
    page.reload()  # the conversation keeps its prompt
    expect(page.locator("#prompt-picker")).to_have_value("urial-k0")


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_on_the_bundled_model(new_page, bundled):
    """A real answer from the bundled model and its default prompt; with URIAL_EDGE_SCREENSHOT set, this
    also writes docs/chat-page.png (1280x800, light theme) for the README."""
    from playwright.sync_api import expect

    from urial_edge.testing.server_process import launch

    proc, server = launch(["--model", str(bundled)], env={**os.environ}, timeout=300)
    try:
        page = open_page(new_page, server)
        ask(page, "What is the capital of France?")
        expect(last_answer(page).locator(".stats")).to_contain_text("tokens/s", timeout=300_000)
        expect(last_answer(page).locator(".message-body")).to_contain_text("Paris")
        if os.environ.get("URIAL_EDGE_SCREENSHOT"):
            page.locator("#new-conversation").click()  # a second conversation (a 270M model keeps single turns best)
            ask(page, "What should I pack for a day hike?")
            expect(last_answer(page).locator(".stats")).to_contain_text("tokens/s", timeout=300_000)
            page.locator("#composer-input").blur()
            out = Path(__file__).resolve().parent.parent / "docs" / "chat-page.png"
            out.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(out))
    finally:
        assert "Traceback" not in stop_server(proc)


def launched_with_browser(tmp_path, argv, env_home):
    """A urial-edge command run with ``$BROWSER`` set to a script that records the URL it is asked to open."""
    import subprocess
    import sys

    log = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text('#!/bin/sh\necho "$1" >> "$URL_LOG"\n')
    script.chmod(0o755)
    env = {**os.environ, "URIAL_EDGE_HOME": str(env_home), "BROWSER": str(script), "URL_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-m", "urial_edge.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)
    return proc, log


def test_serve_open_and_chat_web_open_the_page_in_the_browser(tmp_path, home, tiny_llama):
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    serve, log = launched_with_browser(tmp_path, ["serve", "-m", str(tiny_llama), "-p", str(prompt), "--port", "0",
                                                  "--open"], home)
    try:
        opened = wait_until(lambda: log.exists() and log.read_text().split(), what="the browser to be opened")
        page = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/", opened[0])
        assert page, opened
        status, headers, body = get({"host": "127.0.0.1", "port": int(page.group(1))}, "/")
        assert status == 200 and b"<html" in body.lower()
        # chat --web finds that server and opens the same page, then exits
        (tmp_path / "chat").mkdir()
        chat, chat_log = launched_with_browser(tmp_path / "chat", ["chat", "-m", str(tiny_llama), "-p", str(prompt),
                                                                   "--web"], home)
        assert chat.wait(timeout=120) == 0, chat.stderr.read()
        assert chat_log.read_text().split() == opened
    finally:
        stop_server(serve)
