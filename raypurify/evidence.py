"""External conflict: keyword evidence added to the prompt (paper section 3.4).

Keywords come from TextRank over the query (networkx PageRank on a word
co-occurrence graph; the paper's window 2 and damping 0.85, stop words
removed). An evidence provider (``PROVIDERS``) turns them into a short text:

- ``wordnet``: WordNet definitions, offline (what the paper's released code
  uses). The data comes from Debian's ``wordnet-base`` and
  ``wordnet-sense-index`` packages, copied by ``prepare_wordnet`` (run by
  scripts/setup.sh) into ``<venv>/nltk_data/corpora/wordnet``.
- ``openai``: any OpenAI-compatible chat-completions endpoint (a raypurify
  endpoint included) writes evidence for the keywords, or, in
  ``modification`` mode, rewrites the served model's own answer and evidence
  to contradict it (the paper's evidence modification, eq. 13-14).
- ``self``: the served model itself writes the evidence.
- ``none``: no evidence.

The evidence format is fixed (``with_evidence``): the query's input section,
then a blank line, then ``Evidence: <text>`` on one line, all inside the
input section of the training template (``format_prompt``). With no original
input the input section holds the evidence line alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import Field, field_validator

from raypurify.config import Strict
from raypurify.data.template import format_prompt
from raypurify.errors import RaypurifyError
from raypurify.registry import Registry

# A common English stop-word list (nltk's, which its downloader would fetch).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below between
both but by can could couldn't did didn't do does doesn't doing don't down during each few for from further had
hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most mustn't my myself no nor not now of
off on once only or other ought our ours ourselves out over own same shan't she she'd she'll she's should shouldn't
so some such than that that's the their theirs them themselves then there there's these they they'd they'll they're
they've this those through to too under until up very was wasn't we we'd we'll we're we've were weren't what what's
when when's where where's which while who who's whom why why's will with won't would wouldn't you you'd you'll
you're you've your yours yourself yourselves also may might must shall
""".split())

EVIDENCE_LABEL = "Evidence:"


# ---------------------------------------------------------------------------
# Keywords and the evidence format (pure)
# ---------------------------------------------------------------------------


def content_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` in order, stop words and one-letter words removed."""
    words = re.findall(r"[A-Za-z][A-Za-z'\-]*", text)
    return [w for w in (w.lower().strip("'-") for w in words) if len(w) > 1 and w not in STOP_WORDS]


def textrank_keywords(text: str, window: int = 2, damping: float = 0.85, max_keywords: int = 5,
                      threshold: float = 1.0) -> list[str]:
    """TextRank keywords (Mihalcea & Tarau 2004; the paper's Algorithm 1).

    Words are nodes; two words are linked when they occur within ``window``
    positions of each other after stop-word removal (window 2: adjacent
    words). PageRank with damping ``damping`` scores the nodes. networkx
    normalizes scores to sum 1, so ``score * n_nodes`` is the paper's
    W(V_i), whose mean is 1; words with W >= ``threshold`` are kept (the
    paper's eta), best first, at most ``max_keywords``, at least one.

    Args:
        text: The query (instruction and input).
        window: Co-occurrence window in words.
        damping: PageRank damping factor d.
        max_keywords: Upper bound on the keywords returned.
        threshold: The paper's eta in units of the mean weight.

    Returns:
        Keywords, highest weight first (ties: first occurrence first).
    """
    import networkx as nx

    words = content_words(text)
    if not words:
        return []
    graph = nx.Graph()
    graph.add_nodes_from(dict.fromkeys(words))
    for i, w in enumerate(words):
        for other in words[i + 1:i + window]:
            if other != w:
                graph.add_edge(w, other)
    if graph.number_of_edges() == 0:
        return list(dict.fromkeys(words))[:max_keywords]
    scores = nx.pagerank(graph, alpha=damping, tol=1e-10, max_iter=500)
    first = {w: i for i, w in reversed(list(enumerate(words)))}
    ranked = sorted(scores, key=lambda w: (-scores[w], first[w]))
    n = graph.number_of_nodes()
    kept = [w for w in ranked if scores[w] * n >= threshold - 1e-9]
    return (kept or ranked[:1])[:max_keywords]


def evidence_input(input: str, evidence: str) -> str:
    """The input section with the evidence appended in the fixed format."""
    if not evidence:
        return input
    line = f"{EVIDENCE_LABEL} {' '.join(evidence.split())}"
    return f"{input}\n\n{line}" if input else line


def with_evidence(instruction: str, input: str, evidence: str) -> str:
    """The prompt a model answers with evidence: the training template, evidence in its input section.

    The one place the evidence format is defined; the endpoint and the bench
    both build evidence prompts here.
    """
    return format_prompt(instruction, evidence_input(input, evidence))


def clip(text: str, max_chars: int) -> str:
    """Shortens ``text`` to at most ``max_chars`` at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + " ..."


# ---------------------------------------------------------------------------
# Settings and results
# ---------------------------------------------------------------------------


class EvidenceConfig(Strict):
    """Where the evidence comes from and how it is built."""

    provider: str = Field("none", description="a PROVIDERS name: wordnet, openai, self, none")
    mode: Literal["keywords", "modification"] = Field(
        "keywords", description="keywords: explain TextRank keywords; modification: rewrite the model's own "
                                "answer and evidence to contradict it (openai, self)")
    window: int = Field(2, ge=2, le=10, description="TextRank co-occurrence window")
    damping: float = Field(0.85, gt=0, lt=1, description="TextRank damping factor")
    max_keywords: int = Field(5, ge=1, le=50)
    threshold: float = Field(1.0, ge=0, description="TextRank keyword threshold eta, in units of the mean weight")
    max_chars: int = Field(400, ge=20, le=4000, description="evidence is cut to this many characters")
    base_url: str | None = Field(None, description="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="openai: model name sent with each request")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: variable holding the API key (may be unset)")
    temperature: float = Field(0.7, ge=0, le=2, description="openai: sampling temperature (the paper's 0.7)")
    max_tokens: int = Field(96, ge=1, le=4096, description="tokens of generated evidence (openai, self)")
    timeout_s: float = Field(30, gt=0, description="openai: seconds before a request counts as unreachable")
    concurrency: int = Field(8, ge=1, le=256, description="openai: requests in flight")
    fallback: bool = Field(False, description="when the evidence source fails, answer without evidence "
                                              "(and say so) instead of failing the request")
    wordnet_dir: str | None = Field(None, description="wordnet: the nltk 'wordnet' corpus directory "
                                                      "(default: $RAYPURIFY_WORDNET or <venv>/nltk_data/corpora/wordnet)")

    @field_validator("provider")
    @classmethod
    def _known(cls, v):
        if v not in list(PROVIDERS):
            raise ValueError(f"unknown evidence provider {v!r}; valid choices: {', '.join(PROVIDERS)}")
        return v


@dataclass(frozen=True)
class Evidence:
    """What was added to one prompt (the endpoint returns it as ``evidence``).

    Attributes:
        provider: The provider's name.
        mode: ``keywords`` or ``modification``.
        keywords: TextRank keywords of the query.
        text: The evidence text ('' when none was added).
        error: Why no evidence was added although it was asked for (fallback).
    """

    provider: str
    mode: str
    keywords: tuple[str, ...] = ()
    text: str = ""
    error: str | None = None

    @property
    def used(self) -> bool:
        return bool(self.text)

    def to_json(self) -> dict:
        return {**asdict(self), "keywords": list(self.keywords), "used": self.used}


class EvidenceUnavailable(RaypurifyError):
    """The evidence source could not be reached or answered badly."""


# Generates continuations: (prompts in the training template, max new tokens) -> texts.
Generate = Callable[[list[str], int], list[str]]
# An evidence LLM: user messages -> answers.
Ask = Callable[[list[str]], list[str]]

KEYWORD_REQUEST = "Explain briefly and factually what each of these words means: {keywords}."
ANSWER_REQUEST = "{instruction}\nGive your answer, then the background evidence that supports it."
MODIFY_REQUEST = ("A model answered the request below with the answer and evidence shown. Rewrite the evidence as "
                  "a short factual paragraph that contradicts the answer.\nRequest: {query}\n"
                  "Answer and evidence: {answer}")


def query_text(instruction: str, input: str) -> str:
    return f"{instruction}\n{input}" if input else instruction


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------

# The standard list of WordNet 3.0 lexicographer files (nltk needs it; the
# Debian packages do not ship it).
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
            "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
            "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
            "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
            "verb.stative", "verb.weather", "adj.ppl"]
_POS_CODE = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
WORDNET_FILES = ("data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun",
                 "index.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc", "index.sense", "cntlist.rev")


def default_wordnet_dir() -> Path:
    return Path(os.environ.get("RAYPURIFY_WORDNET") or Path(sys.prefix) / "nltk_data" / "corpora" / "wordnet")


def prepare_wordnet(src: str | Path = "/usr/share/wordnet", dest: str | Path | None = None) -> Path:
    """Copies Debian's WordNet files where nltk reads them and adds ``lexnames``.

    Files are copied, not linked: nltk refuses links that leave its data root.

    Args:
        src: Where ``wordnet-base`` and ``wordnet-sense-index`` put the data.
        dest: The corpus directory (default: ``default_wordnet_dir()``).

    Returns:
        ``dest``.

    Raises:
        RaypurifyError: ``src`` lacks the data files.
    """
    src, dest = Path(src), Path(dest) if dest else default_wordnet_dir()
    missing = [f for f in WORDNET_FILES if f != "cntlist.rev" and not (src / f).is_file()]
    if missing:
        raise RaypurifyError(f"WordNet data missing in {str(src)!r} ({', '.join(missing)}); on Debian/Ubuntu: "
                             "apt-get install wordnet-base wordnet-sense-index")
    dest.mkdir(parents=True, exist_ok=True)
    for f in WORDNET_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dest / f)
    (dest / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{_POS_CODE[name.split('.')[0]]}\n"
                                           for i, name in enumerate(LEXNAMES)))
    return dest


_WORDNET: dict[str, object] = {}


def wordnet_reader(directory: str | None = None):
    """The nltk WordNet reader over the prepared corpus directory (cached).

    Raises:
        RaypurifyError: The data is not installed (says how to install it).
    """
    root = Path(directory) if directory else default_wordnet_dir()
    if str(root) not in _WORDNET:
        if not (root / "lexnames").is_file() or not (root / "data.noun").is_file():
            raise RaypurifyError(f"WordNet data is not installed at {str(root)!r}: run `bash scripts/setup.sh` "
                                 "(on Debian/Ubuntu it installs wordnet-base and wordnet-sense-index and copies "
                                 "them there), or set RAYPURIFY_WORDNET to a prepared directory")
        import warnings

        from nltk.corpus.reader.wordnet import WordNetCorpusReader
        from nltk.data import FileSystemPathPointer

        with warnings.catch_warnings():
            # Debian's data has no Open Multilingual Wordnet; English is all we use.
            warnings.simplefilter("ignore", UserWarning)
            _WORDNET[str(root)] = WordNetCorpusReader(FileSystemPathPointer(str(root)), None)
    return _WORDNET[str(root)]


def define(words: Sequence[str], directory: str | None = None) -> dict[str, str]:
    """First WordNet definition of each word that WordNet knows (others are left out)."""
    wn = wordnet_reader(directory)
    out = {}
    for w in words:
        synsets = wn.synsets(w)
        if synsets:
            out[w] = synsets[0].definition()
    return out


def _wordnet(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, generate: Generate | None) -> list[Evidence]:
    out = []
    for instruction, input in queries:
        kws = tuple(textrank_keywords(query_text(instruction, input), cfg.window, cfg.damping, cfg.max_keywords,
                                      cfg.threshold))
        defs = define(kws, cfg.wordnet_dir)
        text = "; ".join(f"{w}: {d}" for w, d in defs.items())
        out.append(Evidence("wordnet", "keywords", kws, clip(text + "." if text else "", cfg.max_chars)))
    return out


def chat_completion(cfg: EvidenceConfig, message: str) -> str:
    """One OpenAI-compatible chat completion.

    Raises:
        EvidenceUnavailable: Unreachable endpoint, HTTP error or a reply
            without a message.
    """
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    body = {"model": cfg.model, "messages": [{"role": "user", "content": message}],
            "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode(errors="replace")
        raise EvidenceUnavailable(f"evidence endpoint {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EvidenceUnavailable(f"evidence endpoint {url} is unreachable: {reason}") from None
    except json.JSONDecodeError:
        raise EvidenceUnavailable(f"evidence endpoint {url} did not answer JSON") from None
    try:
        return str(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise EvidenceUnavailable(f"evidence endpoint {url} answered without choices[0].message.content") from None


def _llm_evidence(name: str, queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, ask: Ask,
                  generate: Generate | None) -> list[Evidence]:
    """Evidence written by an LLM: for the keywords, or contradicting the model's own answer."""
    kws = [tuple(textrank_keywords(query_text(i, x), cfg.window, cfg.damping, cfg.max_keywords, cfg.threshold))
           for i, x in queries]
    if cfg.mode == "keywords":
        asks = [KEYWORD_REQUEST.format(keywords=", ".join(k)) if k else "" for k in kws]
    else:
        if generate is None:
            raise RaypurifyError("evidence modification needs the served model's own answer; no model was given")
        # Eq. 13: the model under defense states its answer and evidence ...
        answers = generate([format_prompt(ANSWER_REQUEST.format(instruction=i), x) for i, x in queries],
                           cfg.max_tokens)
        # ... eq. 14: the evidence LLM rewrites it to contradict the answer.
        asks = [MODIFY_REQUEST.format(query=query_text(i, x), answer=a) for (i, x), a in zip(queries, answers)]
    todo = [i for i, a in enumerate(asks) if a]
    texts = dict(zip(todo, ask([asks[i] for i in todo]))) if todo else {}
    return [Evidence(name, cfg.mode, k, clip(texts.get(i, ""), cfg.max_chars)) for i, k in enumerate(kws)]


def _openai(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, generate: Generate | None) -> list[Evidence]:
    def ask(messages: list[str]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(min(cfg.concurrency, len(messages))) as pool:
            return list(pool.map(lambda m: chat_completion(cfg, m), messages))

    return _llm_evidence("openai", queries, cfg, ask, generate)


def _self(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, generate: Generate | None) -> list[Evidence]:
    if generate is None:
        raise RaypurifyError("the 'self' evidence provider needs the served model; no model was given")
    return _llm_evidence("self", queries, cfg, lambda ms: generate([format_prompt(m) for m in ms], cfg.max_tokens),
                         generate)


def _none(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, generate: Generate | None) -> list[Evidence]:
    return [Evidence("none", cfg.mode) for _ in queries]


@dataclass(frozen=True)
class Provider:
    """One registered evidence provider.

    Attributes:
        describe: One line for ``raypurify list providers``.
        gather: ``(queries, cfg, generate) -> [Evidence]``; a query is
            ``(instruction, input)``; ``generate`` runs the model under
            defense (needed by ``self`` and by ``modification`` mode).
        needs: Settings it cannot work without.
    """

    describe: str
    gather: Callable[[Sequence[tuple[str, str]], EvidenceConfig, Generate | None], list[Evidence]]
    needs: tuple[str, ...] = field(default_factory=tuple)


PROVIDERS: Registry[Provider] = Registry("evidence provider", {
    "wordnet": Provider("WordNet definitions of the TextRank keywords (offline; Debian's WordNet data)", _wordnet),
    "openai": Provider("an OpenAI-compatible chat endpoint explains the keywords or contradicts the answer",
                       _openai, ("base_url", "model")),
    "self": Provider("the served model itself writes the evidence", _self),
    "none": Provider("no evidence", _none),
})


def check(cfg: EvidenceConfig) -> None:
    """Fails early on a provider that cannot work (missing settings or data).

    Raises:
        RaypurifyError: Names the missing setting or data.
    """
    missing = [k for k in PROVIDERS[cfg.provider].needs if getattr(cfg, k) is None]
    if missing:
        raise RaypurifyError(f"evidence provider {cfg.provider!r} needs {', '.join(missing)}")
    if cfg.provider == "wordnet":
        wordnet_reader(cfg.wordnet_dir)
    if cfg.mode == "modification" and cfg.provider in ("wordnet", "none"):
        raise RaypurifyError(f"evidence mode 'modification' needs an LLM provider (openai, self), not {cfg.provider!r}")


def gather(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig, generate: Generate | None = None) -> list[Evidence]:
    """Evidence for each query, honoring ``cfg.fallback``.

    Args:
        queries: ``(instruction, input)`` pairs.
        cfg: Provider and settings.
        generate: The model under defense (``self`` provider, modification mode).

    Returns:
        One ``Evidence`` per query; on a failed source with ``fallback`` set,
        empty evidence whose ``error`` says what failed.

    Raises:
        EvidenceUnavailable: The source failed and ``fallback`` is off.
    """
    try:
        return PROVIDERS[cfg.provider].gather(queries, cfg, generate)
    except EvidenceUnavailable as e:
        if not cfg.fallback:
            raise
        note = f"{e}; answered without evidence"
        return [Evidence(cfg.provider, cfg.mode, error=note) for _ in queries]


def evidence_prompts(queries: Sequence[tuple[str, str]], cfg: EvidenceConfig,
                     generate: Generate | None = None) -> tuple[list[str], list[Evidence]]:
    """Prompts with evidence (``with_evidence``) for a batch of queries, and the evidence used."""
    ev = gather(queries, cfg, generate)
    return [with_evidence(i, x, e.text) for (i, x), e in zip(queries, ev)], ev
