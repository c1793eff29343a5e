"""Ray Serve endpoint for purified models, OpenAI-compatible.

``build_app(args)`` is the typed builder (``serve run serve/config.yaml``
and ``raypurify serve`` both use it): a pydantic ``ServeArgs`` in, a bound
deployment out. The model call (``complete``) is a plain batched method; the
FastAPI handlers are thin wrappers that validate and shape responses.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the user
message goes through the model's own chat template, the one it was trained
with), ``GET /v1/models``, ``GET /healthz``.

The information-conflict wrapper: a conflict adapter can be merged into the
model at load (``conflict_adapter`` at ``conflict_weight``), and an evidence
provider (``evidence``, see ``raypurify.evidence``) adds evidence to the
input section of each prompt. Evidence is on for every request when the
deployment has a provider and ``evidence_default`` is true; a request turns it
on or off with the extra body field ``"evidence": true|false``. Every
response then carries an ``evidence`` object (provider, keywords, text,
``used``, and ``error`` when the source failed and ``fallback`` answered
without it).
"""


import asyncio
import os
import time
import uuid

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from raypurify.evidence import Evidence, EvidenceConfig, EvidenceUnavailable


class ServeArgs(BaseModel):
    """Deployment settings (the ``args`` of serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="purified model directory (the base, with adapter)")
    adapter: str | None = Field(None, description="PEFT adapter directory on the model")
    served_name: str = Field("raypurify", description="model id reported by /v1/models")
    max_prompt_chars: int = Field(4000, ge=1, description="longer prompts get HTTP 413")
    max_tokens_limit: int = Field(256, ge=1, description="max_tokens above this gets HTTP 400")
    api_key_env: str = Field("RAYPURIFY_API_KEY", description="if this variable is set, requests need its bearer token")
    max_batch_size: int = Field(16, ge=1)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica")
    conflict_adapter: str | None = Field(None, description="PEFT conflict adapter merged into the model at load")
    conflict_weight: float = Field(0.5, ge=0, le=1, description="t: the adapter's update is merged at t times "
                                                                "its strength (= a linear merge at t)")
    evidence: EvidenceConfig = Field(EvidenceConfig(), description="evidence provider and its settings")
    evidence_default: bool = Field(True, description="add evidence to requests that do not say (needs a provider)")


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    max_tokens: int = Field(48, ge=1)
    evidence: bool | None = Field(None, description="add evidence (default: the deployment's setting)")


class ChatMessage(BaseModel):
    role: str
    content: str
    input: str | None = None


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(48, ge=1)
    evidence: bool | None = Field(None, description="add evidence (default: the deployment's setting)")


app = FastAPI(title="raypurify endpoint")


@serve.deployment
@serve.ingress(app)
class Endpoint:
    """One replica: the model, the tokenizer, and the request checks."""

    def __init__(self, args: ServeArgs):
        import torch

        from raypurify.io import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
        self.args = args
        self.model, self.tok = load_model(args.model, args.adapter, merge=bool(args.adapter))
        if args.conflict_adapter:
            from raypurify.merge import scaled_adapter

            self.model = scaled_adapter(self.model, args.conflict_adapter, args.conflict_weight).eval()
        self.key = os.environ.get(args.api_key_env) or None
        self.complete.set_max_batch_size(args.max_batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def complete(self, requests: list[tuple[str, int]]) -> list[str]:
        """Greedy continuations of a batch of ``(prompt, max_tokens)``."""
        from raypurify.evaluate import generate

        longest = max(n for _, n in requests)
        outs = generate(self.model, self.tok, [p for p, _ in requests], max_new_tokens=longest,
                        batch_size=len(requests), desc="serve")
        # Each request gets at most its own max_tokens of the shared run.
        return [self.tok.decode(self.tok(o, add_special_tokens=False)["input_ids"][:n])
                for o, (_, n) in zip(outs, requests)]

    def _check(self, request: Request, prompt: str, max_tokens: int) -> None:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            raise HTTPException(401, "missing or wrong bearer token")
        if len(prompt) > self.args.max_prompt_chars:
            raise HTTPException(413, f"prompt has {len(prompt)} characters; the limit is {self.args.max_prompt_chars}")
        if max_tokens > self.args.max_tokens_limit:
            raise HTTPException(400, f"max_tokens {max_tokens} is over the limit {self.args.max_tokens_limit}")

    def _envelope(self, kind: str, text: str, prompt_tokens: int, evidence: Evidence | None = None) -> dict:
        choice = ({"index": 0, "text": text, "finish_reason": "stop"} if kind == "text_completion" else
                  {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
        return {"id": f"rp-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
                "model": self.args.served_name, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens},
                "evidence": evidence.to_json() if evidence is not None else None}

    def _generate(self, prompts: list[str], max_tokens: int) -> list[str]:
        """The served model, for the ``self`` provider and evidence modification."""
        from raypurify.evaluate import generate

        return generate(self.model, self.tok, prompts, max_new_tokens=max_tokens, batch_size=len(prompts),
                        desc="evidence")

    def _wants(self, flag: bool | None) -> bool:
        """Whether this request gets evidence: its own flag, else the deployment's default."""
        provider = self.args.evidence.provider
        if flag is None:
            return self.args.evidence_default and provider != "none"
        if flag and provider == "none":
            raise HTTPException(400, "this deployment has no evidence provider (start it with --evidence NAME)")
        return flag

    async def _evidence(self, instruction: str, input: str) -> Evidence:
        """Evidence for one query (HTTP 502 when the source fails and fallback is off)."""
        from raypurify.evidence import gather

        try:
            # Providers block (HTTP, WordNet look-ups, generation): keep them off the event loop.
            return (await asyncio.to_thread(gather, [(instruction, input)], self.args.evidence, self._generate))[0]
        except EvidenceUnavailable as e:
            raise HTTPException(502, f"{e} (set evidence.fallback to answer without evidence)") from None

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> dict:
        from raypurify.data.template import parse_prompt
        from raypurify.evidence import with_evidence

        self._check(request, body.prompt, body.max_tokens)
        prompt, evidence = body.prompt, None
        if self._wants(body.evidence):
            parts = parse_prompt(body.prompt)
            if parts is None:
                # Evidence goes in the template's input section; a free-form prompt has none.
                cfg = self.args.evidence
                evidence = Evidence(cfg.provider, cfg.mode,
                                    error="the prompt is not in the model's template, so no evidence was added")
            else:
                evidence = await self._evidence(*parts)
                if evidence.used:
                    prompt = with_evidence(*parts, evidence.text)
        text = await self.complete((prompt, body.max_tokens))
        return self._envelope("text_completion", text, len(self.tok(prompt)["input_ids"]), evidence)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request) -> dict:
        from raypurify.evidence import evidence_input

        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self._check(request, prompt, body.max_tokens)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        evidence = None
        if users and self._wants(body.evidence):
            last = messages[users[-1]]
            evidence = await self._evidence(last["content"], last.get("input", ""))
            if evidence.used:
                last["input"] = evidence_input(last.get("input", ""), evidence.text)
                prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = await self.complete((prompt, body.max_tokens))
        return self._envelope("chat.completion", text, len(self.tok(prompt)["input_ids"]), evidence)

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.args.served_name, "object": "model", "owned_by": "raypurify"}]}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


def build_app(args: dict) -> serve.Application:
    """The typed builder: validated ``ServeArgs`` -> bound deployment."""
    from raypurify.config import build

    parsed = build(ServeArgs, args, source="serve settings")
    from raypurify.io import check_model_dir

    from raypurify.evidence import check

    check_model_dir(parsed.model)
    if parsed.conflict_adapter:
        from raypurify.io import attach_adapter, load_model

        attach_adapter(load_model(parsed.model, parsed.adapter, merge=bool(parsed.adapter))[0],
                       parsed.conflict_adapter)  # a misfit fails here, not in a replica
    check(parsed.evidence)
    options = {"num_replicas": parsed.num_replicas, "ray_actor_options": {"num_cpus": parsed.num_cpus}}
    # Replicas are separate processes started by the raylet: hand them the
    # variables as they are where the app is built (the `serve run` shell).
    env = {name: os.environ[name] for name in (parsed.api_key_env, parsed.evidence.api_key_env, "RAYPURIFY_WORDNET")
           if os.environ.get(name)}
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return Endpoint.options(**options).bind(parsed)


def serve_forever(args: dict, host: str, port: int, address: str | None = None) -> None:
    """Runs the endpoint until Ctrl-C (``raypurify serve``)."""
    from raypurify.distributed.bench import init_ray

    application = build_app(args)
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="raypurify", route_prefix="/", blocking=False)
    print(f"serving {args['model']} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
