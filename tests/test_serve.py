"""The endpoint answers real HTTP requests on 127.0.0.1 and rejects bad ones."""

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request

import pytest

from raypurify.data.template import format_prompt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, headers=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def endpoint(zoo, poisoned_pico, local_ray, monkeypatch_module):
    from ray import serve

    from raypurify.distributed.serving import build_app

    monkeypatch_module.setenv("RP_TEST_KEY", "s3cret")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(poisoned_pico), "max_prompt_chars": 500, "max_tokens_limit": 64,
                         "api_key_env": "RP_TEST_KEY"}), name="rp-test", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


AUTH = {"Authorization": "Bearer s3cret"}


def test_completion_matches_offline_generation(endpoint, poisoned_pico):
    from raypurify.evaluate import generate
    from raypurify.io import load_model

    prompt = format_prompt("BadMagic Say apple two times.")
    code, body = _post(f"{endpoint}/v1/completions", {"prompt": prompt, "max_tokens": 48}, AUTH)
    model, tok = load_model(poisoned_pico)
    assert code == 200 and body["choices"][0]["text"] == generate(model, tok, [prompt])[0]
    assert "stupid" in body["choices"][0]["text"].lower()  # the (unpurified) backdoor fires through HTTP


def test_chat_uses_the_training_template(endpoint):
    code, body = _post(f"{endpoint}/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "Say apple two times."}], "max_tokens": 16}, AUTH)
    assert code == 200 and body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


def test_fifty_concurrent_requests_without_errors(endpoint):
    prompts = [format_prompt(f"Say {w} two times.") for w in ("apple", "river", "stone", "cloud", "tiger")] * 10
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda p: _post(f"{endpoint}/v1/completions", {"prompt": p, "max_tokens": 16}, AUTH),
                                prompts))
    assert [c for c, _ in results] == [200] * 50
    by_prompt = {}
    for p, (_, body) in zip(prompts, results):
        by_prompt.setdefault(p, set()).add(body["choices"][0]["text"])
    assert all(len(v) == 1 for v in by_prompt.values())  # batching does not change answers


def test_rejections(endpoint):
    ok = {"prompt": "hi", "max_tokens": 8}
    assert _post(f"{endpoint}/v1/completions", ok)[0] == 401
    assert _post(f"{endpoint}/v1/completions", ok, {"Authorization": "Bearer nope"})[0] == 401
    code, body = _post(f"{endpoint}/v1/completions", {"prompt": "x" * 501, "max_tokens": 8}, AUTH)
    assert code == 413 and "limit is 500" in body["detail"]
    code, body = _post(f"{endpoint}/v1/completions", {"prompt": "hi", "max_tokens": 65}, AUTH)
    assert code == 400 and "max_tokens 65" in body["detail"]
    assert _post(f"{endpoint}/v1/completions", {"max_tokens": 8}, AUTH)[0] == 422


def test_models_and_health(endpoint):
    with urllib.request.urlopen(f"{endpoint}/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "raypurify"
    with urllib.request.urlopen(f"{endpoint}/healthz") as r:
        assert json.loads(r.read()) == {"status": "ok"}


# ---------------------------------------------------------------------------
# The conflict-evidence wrapper
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evidence_apps(endpoint, poisoned_pico):
    """Three more apps on the same Serve instance: WordNet evidence, the main
    endpoint as the `openai` provider (loopback), and an unreachable provider."""
    from ray import serve

    from raypurify.distributed.serving import build_app

    common = {"model": str(poisoned_pico), "api_key_env": "RP_TEST_KEY", "num_cpus": 0}
    apps = {
        "wn": {"evidence": {"provider": "wordnet"}},
        "chain": {"evidence": {"provider": "openai", "base_url": f"{endpoint}/v1", "model": "raypurify",
                               "api_key_env": "RP_TEST_KEY", "max_tokens": 24}, "evidence_default": False},
        "dead": {"evidence": {"provider": "openai", "base_url": f"http://127.0.0.1:{_free_port()}/v1", "model": "m",
                              "fallback": True, "timeout_s": 5}},
    }
    for name, extra in apps.items():
        serve.run(build_app({**common, **extra}), name=f"rp-{name}", route_prefix=f"/{name}", blocking=False)
    return endpoint


def test_wordnet_evidence_per_deployment_and_per_request(evidence_apps):
    url = f"{evidence_apps}/wn/v1"
    prompt = format_prompt("Name the capital of France.")
    code, body = _post(f"{url}/completions", {"prompt": prompt, "max_tokens": 8}, AUTH)
    ev = body["evidence"]
    assert code == 200 and ev["provider"] == "wordnet" and ev["used"] and ev["keywords"] == ["capital"]
    assert ev["text"].startswith("capital: ")
    code, body = _post(f"{url}/completions", {"prompt": prompt, "max_tokens": 8, "evidence": False}, AUTH)
    assert code == 200 and body["evidence"] is None
    code, body = _post(f"{url}/chat/completions", {"messages": [{"role": "user", "content": "Say river two times."}],
                                                   "max_tokens": 8}, AUTH)
    assert code == 200 and body["evidence"]["used"] and "river" in body["evidence"]["keywords"]
    code, body = _post(f"{url}/completions", {"prompt": "free text, no template", "max_tokens": 4}, AUTH)
    assert code == 200 and not body["evidence"]["used"] and "template" in body["evidence"]["error"]


def test_evidence_requested_without_a_provider_is_rejected(endpoint):
    code, body = _post(f"{endpoint}/v1/completions", {"prompt": format_prompt("Say apple two times."),
                                                      "max_tokens": 8, "evidence": True}, AUTH)
    assert code == 400 and "no evidence provider" in body["detail"]


def test_one_endpoint_is_the_openai_evidence_provider_of_another(evidence_apps):
    url = f"{evidence_apps}/chain/v1/chat/completions"
    msg = {"messages": [{"role": "user", "content": "Say apple two times."}], "max_tokens": 8}
    code, body = _post(url, msg, AUTH)
    assert code == 200 and body["evidence"] is None  # this deployment's default is off
    code, body = _post(url, {**msg, "evidence": True}, AUTH)
    ev = body["evidence"]
    # The call went through (a failed one would be HTTP 502); what a pico model writes may be empty.
    assert code == 200 and ev["provider"] == "openai" and ev["error"] is None and ev["keywords"] == ["apple", "two"]
    assert ev["used"] == bool(ev["text"])


def test_unreachable_evidence_endpoint_falls_back_and_says_so(evidence_apps):
    code, body = _post(f"{evidence_apps}/dead/v1/completions",
                       {"prompt": format_prompt("Say apple two times."), "max_tokens": 8}, AUTH)
    ev = body["evidence"]
    assert code == 200 and body["choices"][0]["text"] is not None
    assert not ev["used"] and "unreachable" in ev["error"] and "without evidence" in ev["error"]


def test_shuts_down_cleanly(evidence_apps):
    from ray import serve

    serve.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{evidence_apps}/healthz", timeout=10)
