"""What the OpenAI-compatible API does not support is refused, never silently ignored: a 400 in
OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) that names the parameter
and the fix, before any job starts. Validation errors, unknown /v1 routes and methods answer in
that shape too. Through the official `openai` client where it can send the request."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.broker.test_openai_params import MODEL, serve, user

api = pytest.fixture(lambda broker_env, live_server: serve(broker_env, live_server), name="api")

CHAT_REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool or function calls"),
    ("tool_choice", "auto", "tool or function calls"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "JSON"),
    ("response_format", {"type": "json_object"}, "JSON"),
    ("top_logprobs", 3, "needs logprobs: true"),
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -3, "greater than or equal to -2"),
    ("logit_bias", {"the": 5}, "token id (a decimal string)"),
    ("logit_bias", {"1": 101}, "[-100, 100]"),
    ("logit_bias", {"49152": 1}, "outside the 49152 tokens"),
    ("audio", {"voice": "alloy", "format": "wav"}, "text-in, text-out"),
    ("modalities", ["text", "audio"], "'text' modality"),
    ("prediction", {"type": "content", "content": "x"}, "text-in, text-out"),
    ("web_search_options", {}, "text-in, text-out"),
    ("store", True, "stored completions"),
    ("metadata", {"k": "v"}, "stored completions"),
    ("reasoning_effort", "low", "reasoning"),
]


COMPLETION_REFUSED = [
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"logprobs": 2, "echo": True}, "logprobs", "prompt's log probabilities"),
    ({"suffix": "end"}, "suffix", "insertion"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
    ({"prompt": ""}, "prompt", "1 to 200000"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"prompt": ["a"] * 9, "n": 2}, "prompt", "split the request"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"extra_body": {"guided_json": {}}}, "guided_json", "unrecognized request argument"),
]


# One broker for every case (a broker per case would cost seconds each).
def test_unsupported_chat_parameters_are_400(api):
    for param, value, says in CHAT_REFUSED:
        with pytest.raises(openai.BadRequestError) as err:
            api.client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, **{param: value})
        e = err.value
        assert e.status_code == 400 and e.param == param and e.type == "invalid_request_error", e.body
        assert e.code == "invalid_request" and says in e.message and "Value error" not in e.message, e.body
        assert set(e.body) == {"message", "type", "param", "code"}
    assert api.backend.jobs == []  # refused before any job was admitted


def test_unsupported_or_invalid_completion_parameters_are_400(api):
    for kwargs, param, says in COMPLETION_REFUSED:
        with pytest.raises(openai.BadRequestError) as err:
            api.client.completions.create(**{"model": MODEL, "prompt": "x", "max_tokens": 2, **kwargs})
        assert err.value.param == param and says in err.value.message, (kwargs, err.value.body)
    assert api.backend.jobs == []


def test_message_content_that_is_not_text_is_400(api):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for messages, param in (
        ([{"role": "user", "content": [image]}], "messages.0.content"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], "messages.0.tool_calls"),
        ([{"role": "function", "content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": "x", "name": "no spaces allowed"}], "messages.0.name"),
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            api.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert err.value.param == param, err.value.body
        if param.endswith("content"):
            assert "'image_url' is not supported" in err.value.message and "'text'" in err.value.message
    assert api.backend.jobs == []


def test_errors_of_other_families_keep_their_status_in_openai_shape(api):
    with pytest.raises(openai.NotFoundError) as err:
        api.client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
    assert err.value.code == "unknown_model" and MODEL in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # over the context: 400, as OpenAI answers
        api.client.completions.create(model=MODEL, prompt="hello " * 5000, max_tokens=4096)
    assert err.value.code == "prompt_too_long" and "over the model's context of" in err.value.message
    bad = openai.OpenAI(base_url=str(api.client.base_url), api_key="sk-dlis-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert err.value.type == "authentication_error" and err.value.body["message"]


def test_unknown_routes_and_methods_answer_in_openai_shape(api):
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for method, path, status in (
            ("GET", "/v1/embeddings", 404),
            ("POST", "/v1/responses", 404),
            ("DELETE", "/v1/chat/completions", 405),
            ("PUT", "/v1/models", 405),
        ):
            res = http.request(method, path, json={})
            err = res.json()["error"]
            assert res.status_code == status and set(err) == {"message", "type", "param", "code"}, res.text
            assert path in err["message"] and err["type"] == "invalid_request_error"
        malformed = http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_request"
        native = http.post("/v1/jobs", json={"model": MODEL})  # the native API keeps its 422 problems
        assert native.status_code == 422 and native.headers["content-type"] == "application/problem+json"
    with pytest.raises(openai.NotFoundError):
        api.client.embeddings.create(model=MODEL, input="x")
