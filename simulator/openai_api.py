"""vLLM's OpenAI-compatible API, as the HTTP driver speaks it: requests in, response bodies and SSE chunks out.

Nothing here touches the engine or a socket. :class:`OpenAIApi` validates and parses a ``/v1/completions`` or
``/v1/chat/completions`` body into what the engine needs (:class:`ParsedRequest`: prompt or messages → token ids
through the tokenizer, ``max_tokens`` checked against ``max_model_len`` and the KV capacity, ``stream``,
``stream_options``, ``kv_transfer_params``, a LoRA adapter named as the model) and formats what goes back: the
non-streaming body, the streaming chunks' byte templates (:class:`StreamChunks`) and the usage block with
``prompt_tokens_details.cached_tokens``. Errors are :class:`ApiError`, answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with vLLM's 4xx. The bytes follow vLLM's output to the field
(``tests/data/vllm_reference``; ``tests/integration/test_fidelity.py`` compares against a live vLLM).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvscale.tokenizer import Tokenizer
from simulator.request import Request

FINGERPRINT = "vllm-0.32.0-kvscale-sim"


def dumps(obj: Any) -> str:
    """Compact JSON, as vLLM (FastAPI/pydantic) writes it."""
    return json.dumps(obj, separators=(",", ":"))


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or self.TYPES.get(status, "BadRequestError")

    @classmethod
    def validation(cls, field: str, message: str) -> ApiError:
        """A request-schema error, shaped like vLLM's (pydantic) validation errors."""
        return cls(400, f"1 validation error:\n  {message}", f"body.{field}" if field else "body", "Bad Request")

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }
        return web.json_response(body, status=self.status, dumps=dumps)


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or an :class:`ApiError` (413 too large, 400 not JSON or not an object)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, "request body too large") from e
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints, nesting
        raise ApiError.validation("", f"JSON decode error: {e}") from e
    if not isinstance(body, dict):
        raise ApiError.validation("", "Input should be a valid dictionary or object")
    return body


# --------------------------------------------------------------------------------------------------------------
# request parsing


def _int_param(body: dict[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError.validation(name, f"'{name}': Input should be a valid integer, got {type(v).__name__}")
    if v < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {v}.", name)
    return v


_TRUE = {"true", "yes", "y", "on", "1", "t"}
_FALSE = {"false", "no", "n", "off", "0", "f"}


def _bool_param(body: dict[str, Any], name: str) -> bool:
    """A boolean with pydantic's lax parsing, as vLLM accepts it ("yes", "true", 1, ...)."""
    v = body.get(name, False)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v.lower() in _TRUE
    raise ApiError.validation(name, f"'{name}': Input should be a valid boolean")


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    lora_name: str | None


def engine_request(
    p: ParsedRequest, *, do_remote_decode: bool = False, remote_prefill: dict[str, Any] | None = None
) -> Request:
    """The engine's request for ``p`` (a P/D prefill leg generates one token; see :mod:`simulator.pd`)."""
    prefix = "chatcmpl-" if p.chat else "cmpl-"
    return Request(
        request_id=prefix + uuid.uuid4().hex,
        prompt_token_ids=p.prompt_token_ids,
        max_tokens=1 if do_remote_decode else p.max_tokens,
        arrival_time=0.0,
        lora_name=p.lora_name,
        do_remote_decode=do_remote_decode,
        remote_prefill=remote_prefill,
        extra_key=p.lora_name.encode() if p.lora_name else b"",
    )


def usage(req: Request) -> dict[str, Any]:
    """The usage block; ``prompt_tokens_details.cached_tokens`` counts the prefix-cache hit."""
    return {
        "prompt_tokens": req.num_prompt_tokens,
        "total_tokens": req.num_prompt_tokens + req.num_output_tokens,
        "completion_tokens": req.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens, 0)},
    }


class OpenAIApi:
    """One server's API surface: its model names and LoRA adapters, context length, KV capacity and tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model: str,
        model_names: Sequence[str],
        lora_modules: Mapping[str, str],
        max_model_len: int,
        default_max_tokens: int,
        kv_capacity_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.model_names = list(model_names)
        self.lora_modules = dict(lora_modules)
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.kv_capacity_tokens = kv_capacity_tokens

    def parse(self, body: dict[str, Any], chat: bool) -> ParsedRequest:
        model = body.get("model")
        if model is None:
            model = self.model_names[0]  # vLLM serves the default model when none is named
        if not isinstance(model, str):
            raise ApiError.validation("model", "'model': Input should be a valid string")
        lora = None
        if model not in self.model_names:
            if model in self.lora_modules:
                lora = model
            else:
                aliases = ", ".join([*self.model_names, *self.lora_modules])
                raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {aliases}.", "model")
        tokens = self._chat_tokens(body) if chat else self._prompt_tokens(body)
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt")
        n = _int_param(body, "n", 1, 1)
        if n != 1:
            raise ApiError(400, "the simulator supports n=1 only", "n")
        max_len = self.max_model_len
        if len(tokens) >= max_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your prompt contains at least "
                f"{len(tokens)} input tokens, which exceeds this limit even without any output tokens. Please "
                f"reduce the length of the input prompt. (parameter=input_tokens, value={len(tokens)})",
                "input_tokens",
            )
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = max_len - len(tokens) if chat else self.default_max_tokens
        max_tokens = _int_param(body, key, default, 1)
        assert max_tokens is not None
        if max_tokens > max_len:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={max_len}. Please request fewer "
                f"output tokens. (parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        max_tokens = min(max_tokens, max_len - len(tokens))  # vLLM caps the output at the context length
        capacity = self.kv_capacity_tokens
        if len(tokens) + max_tokens > capacity:
            raise ApiError(400, f"prompt plus '{key}' ({len(tokens) + max_tokens} tokens) exceeds the KV cache "
                           f"capacity of {capacity} tokens", key)  # fmt: skip
        stream = _bool_param(body, "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError.validation("stream_options", "'stream_options': Input should be a valid dictionary")
        include_usage = bool(opts and opts.get("include_usage"))
        ktp = body.get("kv_transfer_params")
        if ktp is not None and not isinstance(ktp, dict):
            raise ApiError.validation("kv_transfer_params", "'kv_transfer_params': Input should be a valid dictionary")
        for name in ("temperature", "top_p"):
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ApiError.validation(name, f"'{name}': Input should be a valid number")
        return ParsedRequest(chat, model, tokens, max_tokens, stream, include_usage, ktp, lora)

    def _chat_tokens(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message must be an object with a string 'role'", "messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise ApiError(400, "message 'content' must be a string or a list of parts", "messages")
        try:
            return self.tokenizer.encode_chat(messages)
        except Exception as e:  # a chat template may reject a conversation (e.g. roles out of order)
            raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from e

    def _prompt_tokens(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokens = list(prompt)
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in tokens):
                raise ApiError(400, "token id in 'prompt' out of vocabulary range", "prompt")
            return tokens
        if prompt is None:
            raise ApiError(400, "'prompt' is required", "prompt")
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a one-element list of those", "prompt")

    # -- responses -----------------------------------------------------------------------------------------------
    def models(self, created: int) -> dict[str, Any]:
        """``GET /v1/models``: the served names, then the LoRA adapters."""
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.model,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [],
            }
            for name in self.model_names
        ]
        data += [
            {
                "id": lora,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.model_names[0],
                "max_model_len": None,
                "permission": [],
            }
            for lora, path in self.lora_modules.items()
        ]
        return {"object": "list", "data": data}

    def text(self, ids: list[int]) -> str:
        return "".join(self.tokenizer.decode_token(t) for t in ids)

    def completion(self, p: ParsedRequest, req: Request, kv_transfer_params: dict[str, Any] | None) -> web.Response:
        """The non-streaming answer of a finished request."""
        text = self.text(req.output_token_ids)
        u = usage(req)
        u["prompt_tokens_details"].update(created_cache_tokens=0 if p.chat else None, multimodal_tokens=None)
        u["completion_tokens_details"] = None
        body: dict[str, Any] = {"id": req.request_id, "object": "chat.completion" if p.chat else "text_completion",
                                "created": int(time.time()), "model": p.model}  # fmt: skip
        if p.chat:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "reasoning": None}  # fmt: skip
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": req.finish_reason,
                                "stop_reason": None, "token_ids": None, "routed_experts": None}]  # fmt: skip
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason,
                                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None}]  # fmt: skip
        body.update(service_tier=None, system_fingerprint=FINGERPRINT, usage=u)
        if p.chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=kv_transfer_params, ec_transfer_params=None, metrics=None)
        return web.json_response(body, dumps=dumps)


class StreamChunks:
    """The SSE events of one streaming request, as byte templates the driver fills per engine step.

    A token event is ``pre + json(text) + tail`` with ``tail`` = ``post_running``, or for the last event
    ``post_last % json(finish_reason)``. Chat sends ``role_chunk`` just before the first token event (as vLLM does,
    not before the first token exists); completions have no role chunk (``b""``).
    """

    __slots__ = ("chat", "head", "post_last", "post_running", "pre", "role_chunk")

    DONE = b"data: [DONE]\n\n"

    def __init__(self, p: ParsedRequest, req: Request) -> None:
        self.chat = p.chat
        head = dumps({"id": req.request_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
                      "created": int(time.time()), "model": p.model})[:-1]  # fmt: skip
        self.head = head
        self.role_chunk = b""
        if p.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
            self.role_chunk = (
                f'data: {head},"choices":[{dumps(first)}],"prompt_token_ids":null,"prompt_text":null}}\n\n'.encode()
            )
            self.pre = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'.encode()
            post = b'},"logprobs":null,"finish_reason":%b,"token_ids":null}]}\n\n'
            self.post_last = b'},"logprobs":null,"finish_reason":%b,"stop_reason":null,"token_ids":null}]}\n\n'
        else:
            self.pre = f'data: {head},"choices":[{{"index":0,"text":'.encode()
            post = (b',"logprobs":null,"finish_reason":%b,"stop_reason":null,"prompt_token_ids":null,'
                    b'"token_ids":null}]}\n\n')  # fmt: skip
            self.post_last = post
        self.post_running = post % b"null"

    def usage_chunk(self, req: Request) -> bytes:
        """The final usage event (``stream_options.include_usage``): no choices."""
        u = usage(req)
        if self.chat:
            u["prompt_tokens_details"]["created_cache_tokens"] = 0
        return f'data: {self.head},"choices":[],"usage":{dumps(u)},"system_fingerprint":"{FINGERPRINT}"}}\n\n'.encode()
