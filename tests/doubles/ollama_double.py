#!/usr/bin/env python3
"""A DOUBLE of the ollama v0.5.7 binary, for tests only: it is NOT ollama.

No ollama binary can be had where builder's tests run, so this one file stands
in for `/usr/local/bin/ollama` in the test image. It copies ollama v0.5.7's
behaviour where builder touches it, as read from ollama's source at tag v0.5.7
(cmd/cmd.go, api/, parser/parser.go, server/create.go, routes.go, images.go,
manifest.go, layer.go, envconfig/):

* `ollama serve` (alias `start`) binds OLLAMA_HOST, keeps models under
  OLLAMA_MODELS in ollama's layout (blobs/sha256-HEX and
  manifests/registry.ollama.ai/library/NAME/TAG), renames `sha256:HEX` blobs
  at start and, unless OLLAMA_NOPRUNE is set, prunes unreferenced or
  misnamed blobs. HTTP: / , /api/version, /api/tags, /api/ps, /api/show,
  HEAD|POST /api/blobs/:digest, /api/create, /api/generate, /api/chat,
  /api/delete, /v1/chat/completions, /v1/completions.
* Inference is real. Like ollama 0.5.7 (llm/server.go, server/sched.go,
  runners/common.go) it starts a runner process found under
  lib/ollama/runners/*/ollama_llama_server beside the binary, with the same
  flags (--model --ctx-size num_ctx*parallel --batch-size --n-gpu-layers
  --parallel --port ...), waits for its /health while the load progresses
  (OLLAMA_LOAD_TIMEOUT is a stall timer, reset on progress; a client that
  hangs up aborts the load; a loading model is listed in /api/ps), sends /completion requests with the same fields (n_predict, temperature,
  seed, stop, top_k, ... from DefaultOptions <- Modelfile PARAMETERs <-
  request options) and relays the streamed pieces and timings. The
  Modelfile TEMPLATE is applied as template/template.go does (legacy
  .Prompt/.Response templates executed per turn and cut at {{ .Response }};
  .Messages templates once), chat history truncated to num_ctx as
  server/prompt.go does. A runner that dies while loading fails the request
  with "llama runner process has terminated: <its last error line>"; a model
  without tokenizer.ggml.tokens makes the server panic and exit 2, as
  GraphSize does in 0.5.7. Models stay loaded for keep_alive (request,
  OLLAMA_KEEP_ALIVE, default 5m; negative is forever, 0 unloads).
* The client: `create NAME [-f Modelfile] [-q TYPE]`, `list|ls [PREFIX]`,
  `show NAME [--modelfile|--parameters|--template|--system|--license]`,
  `rm NAME...`, `run NAME PROMPT... [--verbose]`, `-v|--version`. It talks
  to the server over HTTP as the real client does (HEAD / first; blobs are
  POSTed with no HEAD before them) and parses Modelfiles with a port of
  ollama's parser state machine.

The same file is the double of ollama v0.32.15 when its `VERSION` line says
0.30 or later (the test archive of that version rewrites the line, as a real
binary has its version compiled in). Then, as v0.32.15's source has it:
* create (server/create.go): `files` in sorted order; GGUFs with
  split.count > 1 grouped by name (`PREFIX-0000k-of-0000N.gguf`) into one
  model layer, with its errors ("split GGUF %q has %d shards, expected %d",
  name and metadata mismatches); every model layer rewritten by
  `lib/ollama/llama-quantize --allow-requantize IN blobs/COPY* COPY`
  (server/quantization.go; split parts hard-linked into blobs/split-gguf-*
  under their own names), the output copied under its digest
  (manifest.NewLayer), the inputs left in blobs/; statuses "parsing GGUF",
  "validating GGUF model" (digest 0000000000000000000), "verifying
  conversion"; input blobs touched (manifest/layer.go touchLayer), which
  only their owner may do; a config without rootfs.
* pruning (server/images.go) spares blobs younger than an hour and folders.
* the runner is `lib/ollama/llama-server` (llm/llama_server.go, llm/
  llama_binary.go), load failures read "llama-server process has
  terminated: exit status N: ..." and "timed out waiting for llama-server to
  start - ...", OLLAMA_NUM_PARALLEL defaults to 1 (envconfig).
Not followed for 0.32.15: the API's new fields (/api/ps context_length,
/api/show capabilities and model_info, thinking), /api/status, 405 for a
wrong method, the cloud features, GPU discovery; llama-server gets only the
flags b4610's llama-server knows (not --no-webui, --offline,
--log-verbosity, --flash-attn VALUE).

Where it knowingly differs from ollama (its fakes):
* The runner is llama.cpp's llama-server, not ollama's Go runner around
  llama.cpp: same flags and request fields (plus --no-warmup: the Go
  runner makes no warm-up decode), but llama-server serves no load progress
  on /health, so the double measures that quantity (the share of the tensor
  data loaded) on its runner's /proc and runs ollama's stall timer on it;
  its sampler chain is
  llama.cpp's common one (ollama 0.5.7's runner uses the same
  common_sampler). No GPU: every layer runs on the CPU, `size_vram` is 0,
  num_gpu is passed as 0 and no memory estimate (EstimateGPULayers) is made;
  parallelism is OLLAMA_NUM_PARALLEL or 4 (ollama's choice without GPUs).
* Options are taken as JSON gives them: Options.FromMap's type coercions and
  errors are not reproduced; unknown options are logged and ignored.
* Templates: only the subset of Go's text/template the presets use (fields,
  if/else if/else, range, with, eq/ne/and/or/not/len/json, trim markers);
  anything else is an error, never a guess. TEMPLATE text given to create is
  not checked as a Go template.
* /api/ps: size is the model file's size (ollama adds its memory estimate).
  The OpenAI routes do not stream; tools, images, format/grammar, suffix
  insertion and embeddings are not implemented. `ollama run` is
  non-interactive only.
* A GGUF blob only needs the b"GGUF" magic at create. The header (key/values,
  tensor shapes) is decoded when it can be, else left empty: real ollama
  refuses a file that does not decode. No chat template is autodetected from
  the GGUF, nothing is pulled from a registry (a FROM naming a model that is
  not local fails with a "pull model manifest" error), quantizing is
  refused, safetensors are not converted. Like ggufLayers, the blob is
  reused only when the GGUF decodes to exactly its file length; else the
  decoded part is copied and the bytes after it fail the create ("invalid
  file magic", "unexpected EOF" below 4 bytes); a second whole GGUF after
  the first (which ollama's loop would take as another layer) fails too.
* Maps ollama iterates in random order (parameters in `show`) come sorted.
* Request lines go to stderr (gin writes its [GIN] lines to stdout), and each
  pruned blob is logged by name (ollama logs only the counts). The
  [GIN-debug] block is printed at start as 0.5.7 prints it, whatever GIN_MODE
  says (routes.go pins gin's mode; an invalid GIN_MODE is not refused here).
* `--version` adds a line saying this is the double. The key pair written
  at start (announced as ollama does) is a placeholder, not an ed25519 key.
* Unimplemented ollama commands and routes (stop, pull, push, cp, ps;
  /api/embed, /api/pull, /api/push, /api/copy, other /v1/ routes) fail.
Standard library only, Python 3.10+: it runs inside the test image.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.5.7"
# The generation decides the behaviour where ollama changed (see CURRENT below):
# 0.30 and later run lib/ollama/llama-server and rewrite GGUFs at create.
CURRENT = tuple(int(p) for p in VERSION.split("-")[0].split(".")[:2]) >= (0, 30)
DOUBLE_NOTE = f"ollama double: a test stand-in for ollama {VERSION}, not the real ollama"
CHUNK = 1 << 20  # 1 MiB: files are hashed and streamed in pieces this size

MT_MODEL = "application/vnd.ollama.image.model"
MT_ADAPTER = "application/vnd.ollama.image.adapter"
MT_PROJECTOR = "application/vnd.ollama.image.projector"
MT_TEMPLATE = "application/vnd.ollama.image.template"
MT_PROMPT = "application/vnd.ollama.image.prompt"  # legacy name of template
MT_SYSTEM = "application/vnd.ollama.image.system"
MT_LICENSE = "application/vnd.ollama.image.license"
MT_PARAMS = "application/vnd.ollama.image.params"
MT_MESSAGES = "application/vnd.ollama.image.messages"
MT_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_TEMPLATE = "{{ .Prompt }}"
DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")


class OllamaError(Exception):
    """An error with ollama's message and, for the server, an HTTP status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


# --------------------------------------------------------------------------
# Environment (envconfig/config.go)


def env_var(key: str) -> str:
    """envconfig.Var: the value, spaces and surrounding quotes trimmed."""
    return os.environ.get(key, "").strip().strip("\"'")


def env_bool(key: str) -> bool:
    """envconfig.Bool: unset or empty is false; a value ParseBool cannot read is true."""
    value = env_var(key)
    if not value:
        return False
    parsed = parse_go_bool(value)
    return True if parsed is None else parsed


def ollama_host() -> tuple[str, str, int]:
    """envconfig.Host: (scheme, host, port) from OLLAMA_HOST."""
    default_port = "11434"
    value = env_var("OLLAMA_HOST")
    scheme, sep, hostport = value.partition("://")
    if not sep:
        scheme, hostport = "http", value
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport = hostport.split("/", 1)[0]
    split = split_host_port(hostport)
    if split is None:
        host, port = "127.0.0.1", default_port
        if hostport:
            host = hostport.strip("[]") if ":" in hostport else hostport
    else:
        host, port = split
    if not re.fullmatch(r"[+-]?[0-9]+", port) or not 0 <= int(port) <= 65535:
        port = default_port
    return scheme, host, int(port)


def split_host_port(hostport: str) -> tuple[str, str] | None:
    """net.SplitHostPort, or None where it fails."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 : end + 2] != ":":
            return None
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None
    host, _, port = hostport.partition(":")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def models_dir() -> str:
    return env_var("OLLAMA_MODELS") or os.path.join(os.path.expanduser("~"), ".ollama", "models")


# --------------------------------------------------------------------------
# Go formatting: JSON numbers, %v, %#v, times, human sizes


class F32(float):
    """A float32 value (api.FormatParams types them so): JSON gets float32's shortest digits."""


def parse_go_bool(text: str) -> bool | None:
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _to_f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _shortest(value: float, bits: int) -> tuple[str, int]:
    """(digits, dp) with value == 0.DIGITS * 10**dp, shortest digits that round-trip."""
    if bits == 32:
        target = _to_f32(value)
        text = repr(target)
        for precision in range(1, 10):
            candidate = f"{target:.{precision}e}"
            if _to_f32(float(candidate)) == target:
                text = candidate
                break
    else:
        text = repr(value)
    _sign, digit_tuple, exponent = decimal.Decimal(text).as_tuple()
    digits = "".join(map(str, digit_tuple)).lstrip("0")  # leading zeros do not move the point
    while digits.endswith("0"):
        digits = digits[:-1]
        exponent += 1
    return digits or "0", len(digits) + exponent if digits else 1


def _fmt_f(digits: str, dp: int) -> str:
    if dp <= 0:
        return "0." + "0" * (-dp) + digits
    if dp >= len(digits):
        return digits + "0" * (dp - len(digits))
    return digits[:dp] + "." + digits[dp:]


def _fmt_e(digits: str, dp: int) -> str:
    exp = dp - 1
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def go_json_float(value: float, bits: int = 64) -> str:
    """encoding/json's float encoding: shortest digits, 'e' only below 1e-6 or from 1e21."""
    if value != value or value in (float("inf"), float("-inf")):
        raise OllamaError(f"json: unsupported value: {go_v_float(value)}")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    magnitude = abs(_to_f32(value) if bits == 32 else value)
    digits, dp = _shortest(magnitude, bits)
    if magnitude < 1e-6 or magnitude >= 1e21:
        text = _fmt_e(digits, dp)
        if len(text) >= 4 and text[-4] == "e" and text[-3] == "-" and text[-2] == "0":
            text = text[:-2] + text[-1]
        return sign + text
    return sign + _fmt_f(digits, dp)


def go_v_float(value: float) -> str:
    """fmt's %v of a float64: strconv 'g' with the shortest digits (1e+06 from a million)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    digits, dp = _shortest(abs(value), 64)
    exp = dp - 1
    if exp < -4 or exp >= 6:
        return sign + _fmt_e(digits, dp)
    return sign + _fmt_f(digits, dp)


def go_is_print(char: str) -> bool:
    """strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return char == " " or unicodedata.category(char)[0] in "LMNPS"


def go_quote(text: str) -> str:
    """strconv.Quote (what %#v prints for a string)."""
    escapes = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif go_is_print(char):
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def go_v(value) -> str:
    """fmt's %v of a JSON-decoded value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return go_v_float(float(value))
    if value is None:
        return "<nil>"
    if isinstance(value, list):
        return "[" + " ".join(go_v(v) for v in value) + "]"
    return str(value)


def go_sharp_v(value) -> str:
    """fmt's %#v of a JSON-decoded scalar."""
    if isinstance(value, str):
        return go_quote(value)
    return go_v(value)


def _go_json_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    # encoding/json escapes HTML characters and the JavaScript line separators.
    return (
        out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    )


def go_json(value) -> str:
    """encoding/json's compact output. Dicts keep their order (pass maps sorted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, F32):
        return go_json_float(value, 32)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_json_float(value, 64)
    if isinstance(value, str):
        return _go_json_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_json_string(str(k))}:{go_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def go_map(value: dict) -> dict:
    """A Go map as encoding/json writes it: keys sorted."""
    return {k: value[k] for k in sorted(value)}


def go_time(seconds: int, nanos: int, utc: bool = False) -> str:
    """time.Time in JSON (RFC 3339 with trimmed nanoseconds), local time unless utc."""
    moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
    if not utc:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    offset = moment.utcoffset() or _dt.timedelta(0)
    if offset == _dt.timedelta(0):
        return text + "Z"
    total = int(offset.total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    return f"{text}{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


def now_go_time() -> str:
    ns = time.time_ns()
    return go_time(ns // 1_000_000_000, ns % 1_000_000_000, utc=True)


def mtime_go_time(path: str) -> str:
    ns = os.stat(path).st_mtime_ns
    return go_time(ns // 1_000_000_000, ns % 1_000_000_000)


def parse_go_time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 time as ollama writes it."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return 0.0
    base, frac, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    moment = _dt.datetime.fromisoformat(base + zone)
    return moment.timestamp() + (float("0." + frac) if frac else 0.0)


def go_duration(ns: int) -> str:
    """time.Duration's String, as gin prints latencies."""
    if ns < 1000:
        return f"{ns}ns"
    for unit, size in (("µs", 1_000), ("ms", 1_000_000)):
        if ns < size * 1000:
            return f"{ns / size:.6f}".rstrip("0").rstrip(".") + unit
    return f"{ns / 1e9:.9f}".rstrip("0").rstrip(".") + "s"


def human_bytes(size: int) -> str:
    """format.HumanBytes (decimal units)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            value = size / scale
            if value >= 10 or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def human_number(count: int) -> str:
    """format.HumanNumber (8.0B style parameter sizes)."""
    for suffix, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.{decimals}f}{suffix}"
    if count >= 1000:
        return f"{count / 1000:.0f}K"
    return str(count)


def human_time(seconds_since_epoch: float, zero: str = "Never") -> str:
    """format.HumanTime ("2 minutes ago")."""
    if not seconds_since_epoch:
        return zero
    delta = time.time() - seconds_since_epoch
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def _human_duration(seconds_f: float) -> str:
    seconds = int(seconds_f)
    if seconds < 1:
        return "Less than a second"
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = int(seconds_f / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds_f / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds_f / 3600) // 24 // 365} years"


# --------------------------------------------------------------------------
# Model names (types/model/name.go)


class Name:
    def __init__(self, host: str = "", namespace: str = "", model: str = "", tag: str = ""):
        self.host, self.namespace, self.model, self.tag = host, namespace, model, tag

    @classmethod
    def parse(cls, text: str) -> "Name":
        """model.ParseName: the bare parts merged with the defaults."""
        name = cls()

        def cut(s: str, sep: str) -> tuple[str, str, bool]:
            index = s.rfind(sep)
            if index < 0:
                return s, "", False
            return s[:index] or "!MISSING!", s[index + len(sep) :] or "!MISSING!", True

        s = text
        if s.rfind(":") > s.rfind("/"):
            s, name.tag, _ = cut(s, ":")
        s, name.model, promised = cut(s, "/")
        if not promised:
            name.model = s
        else:
            s, name.namespace, promised = cut(s, "/")
            if not promised:
                name.namespace = s
            else:
                scheme, sep, host = s.partition("://")
                name.host = host if sep else scheme
        name.host = name.host or DEFAULT_HOST
        name.namespace = name.namespace or DEFAULT_NAMESPACE
        name.tag = name.tag or DEFAULT_TAG
        return name

    @staticmethod
    def _valid_part(kind: str, part: str) -> bool:
        if not 1 <= len(part) <= (350 if kind == "host" else 80):
            return False
        for index, char in enumerate(part):
            word = char.isascii() and (char.isalnum() or char == "_")
            if index == 0:
                if not word:
                    return False
            elif char in "_-":
                continue
            elif char == ".":
                if kind == "namespace":
                    return False
            elif char == ":":
                if kind != "host":
                    return False
            elif not word:
                return False
        return True

    def is_valid(self) -> bool:
        return all(
            self._valid_part(kind, part)
            for kind, part in (("host", self.host), ("namespace", self.namespace), ("model", self.model), ("tag", self.tag))
        )

    def filepath(self) -> str:
        return os.path.join(self.host, self.namespace, self.model, self.tag)

    def display_shortest(self) -> str:
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    def short_tagname(self) -> str:
        """ModelPath.GetShortTagname (the `# FROM` hint in show's Modelfile)."""
        if self.host == DEFAULT_HOST:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def key(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


# --------------------------------------------------------------------------
# The store: blobs, layers and manifests (server/modelpath.go, layer.go, manifest.go, images.go)


def blobs_dir() -> str:
    path = os.path.join(models_dir(), "blobs")
    os.makedirs(path, exist_ok=True)
    return path


def manifests_dir() -> str:
    path = os.path.join(models_dir(), "manifests")
    os.makedirs(path, exist_ok=True)
    return path


def blob_path(digest: str) -> str:
    """GetBlobsPath: only sha256[:-]HEX digests; `:` becomes `-` on disk."""
    if not DIGEST_RE.match(digest):
        raise OllamaError("invalid digest format", 400)
    return os.path.join(blobs_dir(), digest.replace(":", "-"))


def new_layer(chunks, media_type: str) -> dict:
    """NewLayer: stream into a temp file in blobs/ while hashing, then rename it to its digest."""
    fd, temp = tempfile.mkstemp(prefix="sha256-", dir=blobs_dir())
    sha = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                sha.update(chunk)
                handle.write(chunk)
                size += len(chunk)
        digest = "sha256:" + sha.hexdigest()
        path = blob_path(digest)
        status = "using existing layer"
        if not os.path.exists(path):
            status = "creating new layer"
            os.replace(temp, path)
            os.chmod(path, 0o644)
        if CURRENT:  # v0.32.15 manifest/layer.go NewLayer: touchLayer on the blob, new or not
            os.utime(path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return {"mediaType": media_type, "digest": digest, "size": size, "status": f"{status} {digest}"}


def go_os_error(exc: OSError) -> str:
    """An OSError as Go's os package words it ("open /x: no such file or directory")."""
    reason = (exc.strerror or str(exc))
    reason = reason[:1].lower() + reason[1:]
    return f"open {exc.filename}: {reason}" if exc.filename else reason


def new_layer_from_bytes(data: bytes, media_type: str) -> dict:
    return new_layer([data], media_type)


def new_layer_from_layer(digest: str, media_type: str, origin: str) -> dict:
    path = blob_path(digest)
    size = os.stat(path).st_size
    if CURRENT:
        # v0.32.15 manifest/layer.go touchLayer: os.Chtimes(blob, now, now), which
        # needs the blob's owner (or root); a hard link's other name changes too.
        now = time.time()
        try:
            os.utime(path, (now, now))
        except OSError as exc:
            raise OllamaError(f"chtimes {path}: {go_os_error(exc).split(': ', 1)[-1]}") from None
    layer = {"mediaType": media_type, "digest": digest, "size": size}
    if origin:
        layer["from"] = origin
    layer["status"] = f"using existing layer {digest}"
    return layer


def layer_json(layer: dict) -> dict:
    out = {"mediaType": layer["mediaType"], "digest": layer["digest"], "size": layer["size"]}
    if layer.get("from"):
        out["from"] = layer["from"]
    return out


class Manifest:
    def __init__(self, name: Name, path: str, data: dict, digest: str):
        self.name, self.path, self.data, self.digest = name, path, data, digest

    @property
    def layers(self) -> list[dict]:
        return list(self.data.get("layers") or [])

    @property
    def config(self) -> dict:
        return self.data.get("config") or {}

    def all_layers(self) -> list[dict]:
        return self.layers + [self.config]

    def size(self) -> int:
        return sum(int(layer.get("size") or 0) for layer in self.all_layers())

    def mtime(self) -> float:
        return os.stat(self.path).st_mtime


def read_manifest(name: Name) -> Manifest:
    """ParseNamedManifest: FileNotFoundError when the model is absent."""
    path = os.path.join(manifests_dir(), name.filepath())
    with open(path, "rb") as handle:
        raw = handle.read()
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"json: cannot unmarshal {type(data).__name__} into Go value of type server.Manifest")
    return Manifest(name, path, data, hashlib.sha256(raw).hexdigest())


def list_manifests(continue_on_error: bool) -> dict[tuple, Manifest]:
    """Manifests(): every manifests/*/*/*/* file."""
    root = manifests_dir()
    found: dict[tuple, Manifest] = {}
    for host in sorted(os.listdir(root)):
        for level1 in _subdirs(os.path.join(root, host)):
            for level2 in _subdirs(os.path.join(root, host, level1)):
                base = os.path.join(root, host, level1, level2)
                for tag in sorted(os.listdir(base)):
                    if os.path.isdir(os.path.join(base, tag)):
                        continue
                    name = Name(host, level1, level2, tag)
                    if not name.is_valid():
                        if not continue_on_error:
                            raise OllamaError(f"{os.path.join(host, level1, level2, tag)} is not a valid model name")
                        log("WARN", "bad manifest name", path=os.path.join(host, level1, level2, tag))
                        continue
                    try:
                        found[name.key()] = read_manifest(name)
                    except (OSError, ValueError) as exc:
                        if not continue_on_error:
                            raise OllamaError(f"{name.display_shortest()} {exc}") from exc
                        log("WARN", "bad manifest", name=name.display_shortest(), error=str(exc))
    return found


def _subdirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(entry for entry in os.listdir(path) if os.path.isdir(os.path.join(path, entry)))


def existing_name(name: Name) -> Name:
    """getExistingName: adopt the case of parts that match a stored model's."""
    result = Name(*name.key())
    for key in list_manifests(True):
        host, namespace, model, tag = key
        if host.lower() == result.host.lower():
            result.host = host
        if namespace.lower() == result.namespace.lower():
            result.namespace = namespace
        if model.lower() == result.model.lower():
            result.model = model
        if tag.lower() == result.tag.lower():
            result.tag = tag
    return result


def write_manifest(name: Name, config: dict, layers: list[dict]) -> None:
    path = os.path.join(manifests_dir(), name.filepath())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": layer_json(config), "layers": [layer_json(l) for l in layers]}
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(go_json(body) + "\n")


def remove_layer_blob(digest: str) -> None:
    """Layer.Remove: delete the blob unless some manifest still uses it."""
    if not digest:
        return
    for manifest in list_manifests(True).values():
        if any(layer.get("digest") == digest for layer in manifest.all_layers()):
            return
    os.remove(blob_path(digest))


def remove_manifest_layers(manifest: Manifest) -> None:
    for layer in manifest.all_layers():
        if layer.get("digest"):
            try:
                remove_layer_blob(layer["digest"])
            except FileNotFoundError:
                pass


def prune_directory(path: str) -> None:
    """PruneDirectory: remove empty directories, bottom up (the root too)."""
    if os.path.isdir(path) and not os.path.islink(path):
        for entry in os.listdir(path):
            prune_directory(os.path.join(path, entry))
        if not os.listdir(path):
            os.rmdir(path)


def fix_blobs(directory: str) -> None:
    """fixBlobs: rename sha256:HEX to sha256-HEX anywhere under blobs/."""
    for parent, dirs, files in os.walk(directory):
        for entry in files + dirs:
            kind, sep, rest = entry.partition(":")
            if sep and kind == "sha256":
                os.rename(os.path.join(parent, entry), os.path.join(parent, f"sha256-{rest}"))


def prune_layers() -> None:
    """PruneLayers: drop blobs/ entries that are not digests, then blobs no manifest uses."""
    directory = blobs_dir()
    candidates: dict[str, str] = {}
    for entry in sorted(os.listdir(directory)):
        digest = entry.replace("-", ":")
        if CURRENT and os.path.isdir(os.path.join(directory, entry)):
            continue  # v0.32.15 server/images.go: directories are skipped
        if CURRENT and time.time() - os.stat(os.path.join(directory, entry)).st_mtime < 3600:
            continue  # v0.32.15 server/images.go:897, before the name check: files younger than an hour stay
        if not DIGEST_RE.match(digest):
            try:
                os.remove(os.path.join(directory, entry))
                log("INFO", "ollama double: removed invalid blob", blob=entry)
            except OSError as exc:
                log("ERROR", "couldn't remove blob", blob=entry, error=str(exc))
            continue
        candidates[digest] = entry
    log("INFO", f"total blobs: {len(candidates)}")
    for manifest in list_manifests(True).values():
        for layer in manifest.layers:
            candidates.pop(layer.get("digest", ""), None)
        candidates.pop(manifest.config.get("digest", ""), None)
    for digest, entry in sorted(candidates.items()):
        try:
            os.remove(os.path.join(directory, entry))
            log("INFO", "ollama double: removed unused blob", blob=entry)
        except OSError as exc:
            log("INFO", f"couldn't remove file '{os.path.join(directory, entry)}': {exc}")
    log("INFO", f"total unused blobs removed: {len(candidates)}")


# --------------------------------------------------------------------------
# GGUF headers (llm/gguf.go), read leniently


FILE_TYPES = [
    "F32", "F16", "Q4_0", "Q4_1", "Q4_1_F16", "Q4_2", "Q4_3", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
    "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS",
    "IQ1_S", "IQ4_NL", "IQ3_S", "IQ3_M", "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "BF16",
]
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def is_gguf(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


# ggml type -> (elements per block, bytes per block), as ggml.c has them.
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66),
}


def read_gguf_kv(path: str, max_array: int = 5) -> dict:
    """The header's key/values plus general.parameter_count from the tensor shapes.

    Arrays longer than max_array come back empty (show does the same when not
    verbose). Whatever cannot be decoded is left out: a file need only start
    with b"GGUF" here, where ollama would refuse it.
    """
    return _read_gguf(path, max_array)[0]


def gguf_decoded_length(path: str) -> int | None:
    """llm.DecodeGGML's n: the header, the aligned data section, up to the
    last byte of the last tensor (no padding after it). None if it does not decode."""
    return _read_gguf(path, 0)[1]


def _read_gguf(path: str, max_array: int) -> tuple[dict, int | None]:
    kv: dict = {}
    decoded = None
    try:
        with open(path, "rb") as handle:
            reader = _GGUFReader(handle)
            if handle.read(4) != b"GGUF":
                return kv, None
            version = reader.scalar("<I")
            if version not in (1, 2, 3):
                return kv, None
            reader.v1 = version == 1
            count_fmt = "<I" if version == 1 else "<Q"
            tensors = reader.scalar(count_fmt)
            entries = reader.scalar(count_fmt)
            if entries > 1 << 20 or tensors > 1 << 24:
                return kv, None
            for _ in range(entries):
                key = reader.string()
                kv[key] = reader.value(reader.scalar("<I"), max_array)
            parameters = 0
            end = 0
            known = True
            for _ in range(tensors):
                reader.string()
                dims = reader.scalar("<I")
                if dims > 8:
                    raise ValueError("too many dimensions")
                count = 1
                for _ in range(dims):
                    count *= reader.scalar("<Q")
                kind = reader.scalar("<I")
                offset = reader.scalar("<Q")
                parameters += count
                if kind in GGML_BLOCKS:
                    block, size = GGML_BLOCKS[kind]
                    end = max(end, offset + count // block * size)
                else:
                    known = False
            kv["general.parameter_count"] = parameters
            alignment = kv.get("general.alignment", 32) or 32
            data_offset = -(-handle.tell() // alignment) * alignment
            decoded = data_offset + end if known else None
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        pass
    return kv, decoded


class _GGUFReader:
    def __init__(self, handle):
        self.handle = handle
        self.v1 = False

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError("short read")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.scalar("<I" if self.v1 else "<Q")
        if length > 1 << 26:
            raise ValueError("string too long")
        data = self.handle.read(length)
        if len(data) != length:
            raise ValueError("short read")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int, max_array: int):
        if kind == 6:
            return F32(self.scalar("<f"))  # KV keeps float32s; JSON writes their shortest digits
        if kind in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind = self.scalar("<I")
            count = self.scalar("<I" if self.v1 else "<Q")
            if count > max_array:
                if item_kind in _GGUF_SCALARS:
                    self.handle.seek(count * struct.calcsize(_GGUF_SCALARS[item_kind]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        self.value(item_kind, 0)
                return []
            return [self.value(item_kind, max_array) for _ in range(count)]
        raise ValueError(f"invalid type {kind}")


def kv_architecture(kv: dict) -> str:
    value = kv.get("general.architecture")
    return value if isinstance(value, str) else "unknown"


def kv_u64(kv: dict, key: str) -> int:
    value = kv.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0


def kv_file_type(kv: dict) -> str:
    number = kv_u64(kv, "general.file_type") & 0xFFFFFFFF
    if 0 < number < len(FILE_TYPES):
        return FILE_TYPES[number]
    return "unknown"


def kv_media_type(kv: dict) -> str:
    kind = kv.get("general.type")
    if kind == "adapter":
        return MT_ADAPTER
    if f"{kv_architecture(kv)}.vision.block_count" in kv or kind == "projector":
        return MT_PROJECTOR
    return MT_MODEL


# --------------------------------------------------------------------------
# Modelfiles (parser/parser.go): a port of ParseFile's state machine


COMMANDS = ("from", "license", "template", "system", "adapter", "parameter", "message")
ERR_INVALID_COMMAND = 'command must be one of "from", "license", "template", "system", "adapter", "parameter", or "message"'
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _unquote(text: str) -> tuple[str, bool]:
    if text.startswith('"""'):
        if len(text) >= 6 and text.endswith('"""'):
            return text[3:-3], True
        return "", False
    if text.startswith('"'):
        if len(text) >= 2 and text.endswith('"'):
            return text[1:-1], True
        return "", False
    return text, True


def _alpha(char: str) -> bool:
    return "a" <= char <= "z" or "A" <= char <= "Z"


def _next_state(char: str, state: int) -> tuple[int, str | None, str | None]:
    """parseRuneForState: (next state, rune to keep or None, error or None)."""
    space, newline = char in " \t", char in "\r\n"
    if state == _NIL:
        if char == "#":
            return _COMMENT, None, None
        if space or newline:
            return _NIL, None, None
        return _NAME, char, None
    if state == _NAME:
        if _alpha(char):
            return _NAME, char, None
        if space:
            return _VALUE, None, None
        return _NIL, None, "invalid"
    if state == _VALUE:
        if newline or space:
            return _NIL, char, None
        return _VALUE, char, None
    if state == _PARAMETER:
        if _alpha(char) or "0" <= char <= "9" or char == "_":
            return _PARAMETER, char, None
        if space:
            return _VALUE, None, None
        return _NIL, None, "eof"
    if state == _MESSAGE:
        if _alpha(char):
            return _MESSAGE, char, None
        if space:
            return _VALUE, None, None
        return _NIL, None, "eof"
    if newline:  # _COMMENT
        return _NIL, None, None
    return _COMMENT, None, None


def decode_modelfile(data: bytes) -> str:
    """UTF-8 (a BOM dropped) or, behind a BOM, UTF-16, as ParseFile's decoder reads it."""
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        return data.decode("utf-16", errors="replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """ParseFile: commands as (name, args); FROM is "model", a PARAMETER's name is the name."""
    commands: list[tuple[str, str]] = []
    state, line, buffer, role, name = _NIL, 1, "", "", ""
    for char in text:
        if char in "\r\n":
            line += 1
        nxt, kept, err = _next_state(char, state)
        if err == "eof":
            raise OllamaError(f"unexpected EOF: {buffer}")
        if err:
            raise OllamaError(f"(line {line}): {ERR_INVALID_COMMAND}")
        if nxt != state:
            if state == _NAME:
                if buffer.lower() not in COMMANDS:
                    raise OllamaError(f"(line {line}): {ERR_INVALID_COMMAND}")
                lowered = buffer.lower()
                if lowered == "from":
                    name = "model"
                elif lowered == "parameter":
                    nxt = _PARAMETER
                elif lowered == "message":
                    nxt = _MESSAGE
                    name = lowered
                else:
                    name = lowered
            elif state == _PARAMETER:
                name = buffer
            elif state == _MESSAGE:
                if buffer not in ("system", "user", "assistant"):
                    raise OllamaError(f"(line {line}): {ERR_INVALID_ROLE}")
                role = buffer
            elif state == _VALUE:
                value, ok = _unquote(buffer.strip(_GO_SPACE))
                if not ok or kept in (" ", "\t"):
                    buffer += kept or ""
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buffer, state = "", nxt
        if kept is not None and go_is_print(kept):
            buffer += kept
    if state == _VALUE:
        value, ok = _unquote(buffer.strip(_GO_SPACE))
        if not ok:
            raise OllamaError("unexpected EOF")
        if role:
            value = f"{role}: {value}"
        commands.append((name, value))
    elif state not in (_NIL, _COMMENT):
        raise OllamaError("unexpected EOF")
    if not any(command == "model" for command, _ in commands):
        raise OllamaError("no FROM line")
    return commands


def quote_modelfile(text: str) -> str:
    """parser.quote, as Command.String writes values back."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


# api/types.go Options and Runner, v0.5.7: the names PARAMETER accepts and their types.
PARAMETER_TYPES = {
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float", "min_p": "float",
    "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "mirostat": "int", "mirostat_tau": "float",
    "mirostat_eta": "float", "stop": "list",
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "low_vram": "bool", "f16_kv": "bool",
    "logits_all": "bool", "vocab_only": "bool", "use_mmap": "bool", "use_mlock": "bool", "num_thread": "int",
}
_GO_FLOAT = re.compile(r"[+-]?(?:(?:\d+(?:_\d+)*)?\.?\d*(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)


def format_param(name: str, value: str):
    """api.FormatParams for one PARAMETER line."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise OllamaError(f"unknown parameter '{name}'")
    if kind == "int":
        if not re.fullmatch(r"[+-]?[0-9]+", value) or not -(2**63) <= int(value) < 2**63:
            raise OllamaError(f"invalid int value [{value}]")
        return int(value)
    if kind == "float":
        try:
            if not _GO_FLOAT.fullmatch(value) or "_" in value:
                raise ValueError(value)
            number = float(value)
            if abs(number) != float("inf") and abs(_to_f32(number)) == float("inf"):
                raise ValueError(value)
        except (ValueError, OverflowError):
            raise OllamaError(f"invalid float value [{value}]") from None
        return F32(_to_f32(number))
    if kind == "bool":
        parsed = parse_go_bool(value)
        if parsed is None:
            raise OllamaError(f"invalid bool value [{value}]")
        return parsed
    return [value]


def expand_path(path: str, relative_dir: str) -> str:
    """expandPathImpl: absolute, ~ or ~user, else relative to the Modelfile's directory."""
    if path.startswith("/") or path.startswith("\\"):
        return os.path.abspath(path)
    if path.startswith("~"):
        if path == "~" or path.startswith("~/"):
            return os.path.abspath(os.path.expanduser("~") + path[1:])
        expanded = os.path.expanduser(path)
        if expanded == path:
            user = path[1:].split("/", 1)[0]
            raise OllamaError(f"failed to find user '{user}': user: unknown user {user}")
        return os.path.abspath(expanded)
    return os.path.abspath(os.path.join(relative_dir, path))


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def files_for_model(directory: str) -> list[str]:
    """filesForModel, by name only (ollama also sniffs each file's content type)."""
    import glob

    def matches(pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))

    files: list[str] = []
    for pattern in ("model*.safetensors", "adapters.safetensors", "adapter_model.safetensors", "pytorch_model*.bin",
                    "consolidated*.pth", "*.gguf", "*.bin"):
        files = matches(pattern)
        if files:
            break
    else:
        raise OllamaError("no Modelfile or safetensors files found")
    files += matches("*.json") + matches("**/*.json")
    tokenizer = matches("tokenizer.model") or matches("**/tokenizer.model")
    return files + tokenizer


def file_digest_map(path: str) -> dict[str, str]:
    """fileDigestMap: FileNotFoundError when the path does not exist."""
    os.stat(path)
    files = files_for_model(path) if os.path.isdir(path) else [path]
    return {f: file_sha256(f) for f in files}


def create_request(commands: list[tuple[str, str]], relative_dir: str) -> dict:
    """Modelfile.CreateRequest: the JSON the client sends (files still keyed by path)."""
    request: dict = {}
    params: dict = {}
    messages: list[dict] = []
    licenses: list[str] = []
    for command, args in commands:
        if command == "model":
            path = expand_path(args, relative_dir)
            try:
                digests = file_digest_map(path)
            except FileNotFoundError:
                request["from"] = args
                continue
            request.setdefault("files", {}).update(digests)
        elif command == "adapter":
            request["adapters"] = file_digest_map(expand_path(args, relative_dir))
        elif command in ("template", "system"):
            request[command] = args
        elif command == "license":
            licenses.append(args)
        elif command == "message":
            role, _, content = args.partition(": ")
            messages.append({"role": role, "content": content})
        elif command == "penalize_newline":
            print(f"warning: parameter {command} is deprecated")
        else:
            value = format_param(command, args)
            if isinstance(params.get(command), list):
                params[command] = params[command] + value
            else:
                params[command] = value
    if params:
        request["parameters"] = params
    if messages:
        request["messages"] = messages
    if licenses:
        request["license"] = licenses
    return request


# --------------------------------------------------------------------------
# Server


_LOG_LOCK = threading.Lock()
_STORE_LOCK = threading.RLock()  # create and delete change manifests one at a time


def log(level: str, message: str, **attrs) -> None:
    """slog's text handler on stderr."""
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [f"time={stamp}", f"level={level}", "source=ollama_double.py", f"msg={_slog_value(message)}"]
    parts += [f"{key}={_slog_value(str(value))}" for key, value in attrs.items()]
    with _LOG_LOCK:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()


def _slog_value(text: str) -> str:
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return go_quote(text)


class _Body:
    """A request body read in pieces: Content-Length or chunked."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.rfile = handler.rfile
        encoding = (handler.headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in encoding
        length = handler.headers.get("Content-Length")
        self.remaining = int(length) if (length or "").strip().isdigit() and not self.chunked else 0
        self.done = not (self.chunked or self.remaining > 0)

    def chunks(self, size: int = CHUNK):
        if self.chunked:
            while True:
                line = self.rfile.readline(65537)
                chunk_size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if chunk_size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = chunk_size
                while left:
                    data = self.rfile.read(min(size, left))
                    if not data:
                        raise ConnectionError("request body ended early")
                    left -= len(data)
                    yield data
                self.rfile.readline(3)
        else:
            while self.remaining:
                data = self.rfile.read(min(size, self.remaining))
                if not data:
                    raise ConnectionError("request body ended early")
                self.remaining -= len(data)
                yield data
        self.done = True

    def read_all(self) -> bytes:
        return b"".join(self.chunks())


class BadRequest(OllamaError):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"ollama-double/{VERSION}"
    sys_version = ""

    def version_string(self) -> str:
        return f"ollama-double/{VERSION} (a test double, not ollama)"

    # -- plumbing -------------------------------------------------------

    def _dispatch(self) -> None:
        started = time.monotonic_ns()
        self._status = 0
        self._body = _Body(self)
        url = urllib.parse.urlsplit(self.path)
        self._route_path = url.path
        try:
            self._route(self.command, url.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the double: answer 500 and say so
            log("ERROR", "ollama double: handler failed", error=repr(exc))
            self.close_connection = True
            if not self._status:
                self._json(500, {"error": str(exc)})
        if not self._body.done:
            self.close_connection = True  # the body was left unread: this connection cannot be reused
        self._log_gin(time.monotonic_ns() - started, url)

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _dispatch

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-") -> None:  # gin-style lines are written by _log_gin
        pass

    def log_message(self, fmt: str, *args) -> None:
        log("INFO", "ollama double: " + (fmt % args))

    def _log_gin(self, latency_ns: int, url) -> None:
        path = url.path + (f"?{url.query}" if url.query else "")
        stamp = time.strftime("%Y/%m/%d - %H:%M:%S")
        line = f"[GIN] {stamp} | {self._status:3d} | {go_duration(latency_ns):>13} | {self.client_address[0]:>15} | {self.command:<7}  {go_quote(path)}\n"
        with _LOG_LOCK:
            sys.stderr.write(line)
            sys.stderr.flush()

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if not self._body.done:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, value) -> None:
        self._send(status, go_json(value).encode(), "application/json; charset=utf-8")

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (Go cancels the request's
        context then): readable, and reading would give end of file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _request_json(self) -> dict:
        """ShouldBindJSON: a JSON object; unknown keys are ignored."""
        raw = self._body.read_all()
        if not raw.strip():
            raise BadRequest("missing request body", 400)
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"invalid character in request body: {exc}", 400) from None
        if not isinstance(value, dict):
            raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into Go value of type api request", 400)
        return value

    @staticmethod
    def _field(request: dict, key: str, kind: type, default):
        value = request.get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into Go struct field .{key}", 400)
        return value

    def _stream_start(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()

    def _stream_line(self, value) -> None:
        data = (go_json(value) + "\n").encode()
        if self._chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    def _stream_end(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    # -- routes ---------------------------------------------------------

    def _route(self, method: str, path: str) -> None:
        try:
            if path == "/" and method in ("GET", "HEAD"):
                return self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
            if path == "/api/version" and method in ("GET", "HEAD"):
                return self._json(200, {"version": VERSION})
            if path == "/api/tags" and method in ("GET", "HEAD"):
                return self._tags()
            if path == "/api/ps" and method == "GET":
                return self._ps()
            if path.startswith("/api/blobs/") and "/" not in path[len("/api/blobs/") :] and len(path) > len("/api/blobs/"):
                digest = urllib.parse.unquote(path[len("/api/blobs/") :])
                if method == "HEAD":
                    return self._head_blob(digest)
                if method == "POST":
                    return self._post_blob(digest)
            if method == "POST" and path == "/api/show":
                return self._show()
            if method == "POST" and path == "/api/create":
                return self._create()
            if method == "POST" and path == "/api/generate":
                return self._generate()
            if method == "POST" and path == "/api/chat":
                return self._chat()
            if method == "POST" and path == "/v1/chat/completions":
                return self._openai(chat=True)
            if method == "POST" and path == "/v1/completions":
                return self._openai(chat=False)
            if method == "DELETE" and path == "/api/delete":
                return self._delete()
            self._send(404, b"404 page not found", "text/plain")
        except BadRequest as exc:
            self._error(exc.status or 400, exc.message)

    def _tags(self) -> None:
        models = []
        for key, manifest in list_manifests(True).items():
            config: dict = {}
            if manifest.config.get("digest"):
                try:
                    with open(blob_path(manifest.config["digest"]), "rb") as handle:
                        config = json.load(handle)
                except (OSError, ValueError, OllamaError) as exc:
                    log("WARN", "bad manifest config", name=manifest.name.display_shortest(), error=str(exc))
                    continue
            mtime_ns = os.stat(manifest.path).st_mtime_ns
            models.append((mtime_ns // 1_000_000_000, {
                "name": manifest.name.display_shortest(),
                "model": manifest.name.display_shortest(),
                "modified_at": go_time(mtime_ns // 1_000_000_000, mtime_ns % 1_000_000_000),
                "size": manifest.size(),
                "digest": manifest.digest,
                "details": _details(config, parent=""),
            }))
        models.sort(key=lambda item: -item[0])  # newest first, stable
        self._json(200, {"models": [model for _, model in models]})

    def _head_blob(self, digest: str) -> None:
        try:
            path = blob_path(digest)
        except OllamaError as exc:
            return self._error(400, exc.message)
        if not os.path.exists(path):
            return self._error(404, f"blob {go_quote(digest)} not found")
        self._send(200, b"", None)

    def _post_blob(self, digest: str) -> None:
        try:
            path = blob_path(digest)
        except OllamaError as exc:
            return self._error(400, exc.message)
        if os.path.exists(path):
            return self._send(200, b"", None)  # the body is not read
        try:
            layer = new_layer(self._body.chunks(), "")
        except ConnectionError as exc:
            return self._error(500, str(exc))
        if layer["digest"] != digest:
            # ollama keeps the bytes under their real digest and still answers 400
            return self._error(400, f"digest mismatch, expected {go_quote(digest)}, got {go_quote(layer['digest'])}")
        self._send(201, b"", None)

    def _show(self) -> None:
        request = self._request_json()
        model = self._field(request, "model", str, "") or self._field(request, "name", str, "")
        if not model:
            raise BadRequest("model is required", 400)
        verbose = bool(self._field(request, "verbose", bool, False))
        name = Name.parse(model)
        if not name.is_valid():
            return self._error(500, "invalid model path")
        name = existing_name(name)
        try:
            loaded = load_model(name)
        except FileNotFoundError:
            return self._error(404, f"model '{model}' not found")
        system = self._field(request, "system", str, "") or loaded["system"]
        response: dict = {}
        if loaded["license"]:
            response["license"] = "\n".join(loaded["license"])
        response["modelfile"] = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {name.short_tagname()}\n\n" + model_modelfile(loaded, system)
        )
        params = []
        for key in sorted(loaded["options"]):
            value = loaded["options"][key]
            for item in value if isinstance(value, list) else [value]:
                params.append(f"{key:<30} {go_sharp_v(item)}")
        if params:
            response["parameters"] = "\n".join(params)
        response["template"] = loaded["template"]
        if system:
            response["system"] = system
        response["details"] = _details(loaded["config"], parent=loaded["parent"])
        if loaded["messages"]:
            response["messages"] = loaded["messages"]
        model_info = {}
        if loaded["model_path"]:
            model_info = read_gguf_kv(loaded["model_path"], -1 if verbose else 5)
            for key in ("general.name", "tokenizer.chat_template"):
                model_info.pop(key, None)
        if model_info:
            response["model_info"] = go_map(model_info)
        if loaded["projectors"]:
            projector_info = read_gguf_kv(loaded["projectors"][0], -1 if verbose else 5)
            if projector_info:
                response["projector_info"] = go_map(projector_info)
        response["modified_at"] = mtime_go_time(loaded["manifest"].path)
        self._json(200, response)

    def _create(self) -> None:
        request = self._request_json()
        model = self._field(request, "model", str, "") or self._field(request, "name", str, "")
        stream = self._field(request, "stream", bool, True)
        for key in ("files", "adapters", "parameters"):
            self._field(request, key, dict, None)
        self._field(request, "messages", list, None)
        name = Name.parse(model)
        if not name.is_valid():
            raise BadRequest("invalid model name", 400)
        with _STORE_LOCK:
            name = existing_name(name)
            events = create_events(request, name)
            if not stream:
                for event in events:  # waitForStream: the first error or success answers
                    if "error" in event:
                        return self._json(event.get("status") or 500, {"error": event["error"]})
                    if event.get("status") == "success":
                        return self._json(200, event)
                return self._error(500, "unexpected end of progress response")
            self._stream_start("application/x-ndjson")
            for event in events:
                self._stream_line(event)
            self._stream_end()

    def _model_for(self, model_name: str) -> tuple[Name, dict] | None:
        """The named model, or None after answering 404 as ollama does."""
        name = Name.parse(model_name)
        if not name.is_valid():
            self._error(404, f"model '{model_name}' not found")
            return None
        try:
            name = existing_name(name)
            return name, load_model(name)
        except FileNotFoundError:
            self._error(404, f"model '{model_name}' not found")
            return None

    def _run_completion(self, request: dict, name: Name, model: dict, prompt_for, respond) -> None:
        """scheduleRunner + Completion, shared by generate, chat and the OpenAI routes.
        `prompt_for(runner, options)` builds the prompt; `respond(kind, value)` is
        called with ("piece", text) for each piece, then ("done", metrics) once."""
        started = time.monotonic_ns()
        keep_alive = request_keep_alive(request.get("keep_alive"))
        options = merge_options(model["options"], request.get("options"))
        try:
            runner, _took = scheduler().acquire(name, model, options, keep_alive, self._client_gone)
        except OllamaError as exc:
            return respond("error", exc.message)
        loaded = time.monotonic_ns()
        try:
            prompt = prompt_for(runner, options)
            if prompt is None:  # a load-only request
                return respond("load", {"total_duration": loaded - started, "load_duration": loaded - started})
            text: list[str] = []

            def piece(content: str) -> None:
                text.append(content)
                respond("piece", content)

            try:
                metrics = runner.completion(prompt, options, piece)
            except ClientGone:  # closing the runner connection ends the generation there
                self.close_connection = True
                return
            metrics["prompt"], metrics["text"], metrics["runner"] = prompt, "".join(text), runner
            now = time.monotonic_ns()
            metrics["total_duration"], metrics["load_duration"] = max(now - started, 1), max(loaded - started, 1)
            respond("done", metrics)
        except OllamaError as exc:
            respond("error", exc.message)
        finally:
            scheduler().release(runner, keep_alive)

    def _answer(self, stream: bool, final_of, piece_of):
        """A respond() for _run_completion writing ollama's NDJSON or one JSON object."""
        state = {"started": False, "text": []}

        def respond(kind: str, value) -> None:
            if kind == "error":
                if state["started"]:
                    self._stream_line({"error": value})
                    self._stream_end()
                else:
                    self._error(500, value)
                return
            if kind == "piece":
                state["text"].append(value)
                if stream:
                    if not state["started"]:
                        self._stream_start("application/x-ndjson")
                        state["started"] = True
                    self._stream_line(piece_of(value))
                return
            final = final_of(kind, value, "" if stream else "".join(state["text"]))
            if stream:
                if not state["started"]:
                    self._stream_start("application/x-ndjson")
                    state["started"] = True
                self._stream_line(final)
                self._stream_end()
            else:
                self._json(200, final)

        return respond

    def _generate(self) -> None:
        request = self._request_json()
        model_name = self._field(request, "model", str, "")
        prompt = self._field(request, "prompt", str, "")
        stream = self._field(request, "stream", bool, True)
        raw = self._field(request, "raw", bool, False)
        found = self._model_for(model_name)
        if found is None:
            return
        name, model = found
        if not prompt and _zero_keep_alive(request.get("keep_alive")):
            scheduler().expire(model["model_path"])
            return self._json(200, {"model": model_name, "created_at": now_go_time(), "response": "", "done": True, "done_reason": "unload"})
        system = self._field(request, "system", str, "")
        template_text = self._field(request, "template", str, "")
        context = request.get("context")
        if raw and (template_text or system or context):
            return self._error(400, "raw mode does not support template, system, or context")

        def prompt_for(runner: Runner, _options: dict) -> str | None:
            if not prompt:
                return None
            if raw:
                return prompt
            template = Template(template_text or model["template"])
            messages = []
            if system or model["system"]:
                messages.append({"role": "system", "content": system or model["system"]})
            if context is None:
                messages += model["messages"]
            messages.append({"role": "user", "content": prompt})
            return template.execute(messages, suffix=self._field(request, "suffix", str, ""), prompt=prompt)

        def final_of(kind: str, value: dict, text: str) -> dict:
            if kind == "load":
                return {"model": model_name, "created_at": now_go_time(), "response": "", "done": True, "done_reason": "load"}
            answer = {"model": model_name, "created_at": now_go_time(), "response": text, "done": True, "done_reason": value["done_reason"]}
            if not raw:
                answer["context"] = value["runner"].tokenize(value["prompt"] + value["text"])
            answer.update({k: value[k] for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")})
            return answer

        def piece_of(content: str) -> dict:
            return {"model": model_name, "created_at": now_go_time(), "response": content, "done": False}

        self._run_completion(request, name, model, prompt_for, self._answer(stream is not False, final_of, piece_of))

    def _chat_prompt(self, model: dict, messages: list[dict], runner: Runner, options: dict) -> str:
        """server/prompt.go chatPrompt: the latest messages that fit num_ctx, system messages kept."""
        template = Template(model["template"])
        keep = 0
        for start in range(len(messages) - 1, -1, -1):
            candidate = [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]
            if len(runner.tokenize(template.execute(candidate))) > int(options["num_ctx"]):
                break
            keep = start
        return template.execute([m for m in messages[:keep] if m.get("role") == "system"] + messages[keep:])

    def _chat(self) -> None:
        request = self._request_json()
        model_name = self._field(request, "model", str, "")
        stream = self._field(request, "stream", bool, True)
        messages = request.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("json: cannot unmarshal messages", 400)
        found = self._model_for(model_name)
        if found is None:
            return
        name, model = found
        if not messages and _zero_keep_alive(request.get("keep_alive")):
            scheduler().expire(model["model_path"])
            return self._json(200, {"model": model_name, "created_at": now_go_time(), "message": {"role": "assistant", "content": ""}, "done_reason": "unload", "done": True})
        history = list(model["messages"]) + messages
        if messages and messages[0].get("role") != "system" and model["system"]:
            history = [{"role": "system", "content": model["system"]}] + history

        def prompt_for(runner: Runner, options: dict) -> str | None:
            return self._chat_prompt(model, history, runner, options) if messages else None

        def final_of(kind: str, value: dict, text: str) -> dict:
            answer = {"model": model_name, "created_at": now_go_time(), "message": {"role": "assistant", "content": text}}
            if kind == "load":
                return {**answer, "done_reason": "load", "done": True}
            answer.update(done_reason=value["done_reason"], done=True)
            answer.update({k: value[k] for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")})
            return answer

        def piece_of(content: str) -> dict:
            return {"model": model_name, "created_at": now_go_time(), "message": {"role": "assistant", "content": content}, "done": False}

        self._run_completion(request, name, model, prompt_for, self._answer(stream is not False, final_of, piece_of))

    def _ps(self) -> None:
        models = []
        for runner in scheduler().loaded():
            config: dict = {}
            try:
                config = load_model(runner.name)["config"]
            except (OSError, ValueError, OllamaError):
                pass
            expires = runner.expires_wall
            if runner.loading:  # routes.go PsHandler: expiresAt not set yet, so now + the session's duration
                session = env_duration("OLLAMA_KEEP_ALIVE", 300.0) if runner.session is None else runner.session
                expires = FOREVER if session == FOREVER else time.time() + session
            if expires == FOREVER:  # time.Now().Add(math.MaxInt64): about 292.3 years on
                expires = time.time() + (2**63 - 1) / 1e9
            expires_at = go_time(int(expires), int((expires % 1) * 1e9))
            models.append({
                "name": runner.name.display_shortest(), "model": runner.name.display_shortest(), "size": runner.size,
                "digest": runner.digest, "details": _details(config, ""), "expires_at": expires_at, "size_vram": 0,
            })
        self._json(200, {"models": models})

    # -- the OpenAI-compatible routes (openai/openai.go) ---------------------

    def _openai_error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "api_error"
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    @staticmethod
    def _openai_options(request: dict) -> dict:
        options: dict = {}
        if isinstance(request.get("stop"), (str, list)):
            options["stop"] = [request["stop"]] if isinstance(request["stop"], str) else request["stop"]
        if request.get("max_tokens") is not None:
            options["num_predict"] = request["max_tokens"]
        options["temperature"] = 1.0 if request.get("temperature") is None else request["temperature"]
        if request.get("seed") is not None:
            options["seed"] = request["seed"]
        for key in ("frequency_penalty", "presence_penalty"):
            if request.get(key) is not None:
                options[key] = request[key]
        options["top_p"] = request.get("top_p") or 1.0
        return options

    def _openai(self, chat: bool) -> None:
        try:
            request = self._request_json()
        except BadRequest as exc:
            return self._openai_error(400, exc.message)
        if request.get("stream"):
            return self._openai_error(400, "the ollama double does not stream the OpenAI routes")
        model_name = request.get("model") or ""
        name = Name.parse(model_name)
        try:
            name = existing_name(name) if name.is_valid() else name
            model = load_model(name)
        except (FileNotFoundError, OllamaError):
            return self._openai_error(404, f"model \"{model_name}\" not found, try pulling it first")
        native = {"model": model_name, "options": self._openai_options(request)}  # keep_alive is not mapped
        if chat:
            messages = request.get("messages") or []
            history = list(model["messages"]) + messages
            if messages and messages[0].get("role") != "system" and model["system"]:
                history = [{"role": "system", "content": model["system"]}] + history

            def prompt_for(runner: Runner, options: dict) -> str:
                return self._chat_prompt(model, history, runner, options)
        else:
            prompt = request.get("prompt") or ""

            def prompt_for(runner: Runner, _options: dict) -> str:
                messages = ([{"role": "system", "content": model["system"]}] if model["system"] else []) + [{"role": "user", "content": prompt}]
                return Template(model["template"]).execute(messages, suffix=request.get("suffix") or "", prompt=prompt)

        serial = int.from_bytes(os.urandom(2), "big") % 999

        def respond(kind: str, value) -> None:
            if kind == "error":
                return self._openai_error(500, value)
            if kind != "done":
                return
            finish = "length" if value["done_reason"] == "length" else "stop"
            usage = {"prompt_tokens": value["prompt_eval_count"], "completion_tokens": value["eval_count"],
                     "total_tokens": value["prompt_eval_count"] + value["eval_count"]}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": value["text"]}, "finish_reason": finish}
                body = {"id": f"chatcmpl-{serial}", "object": "chat.completion", "created": int(time.time()), "model": model_name,
                        "system_fingerprint": "fp_ollama", "choices": [choice], "usage": usage}
            else:
                choice = {"text": value["text"], "index": 0, "finish_reason": finish}
                body = {"id": f"cmpl-{serial}", "object": "text_completion", "created": int(time.time()), "model": model_name,
                        "system_fingerprint": "fp_ollama", "choices": [choice], "usage": usage}
            self._json(200, body)

        self._run_completion(native, name, model, prompt_for, respond)

    def _delete(self) -> None:
        request = self._request_json()
        model = self._field(request, "model", str, "") or self._field(request, "name", str, "")
        name = Name.parse(model)
        if not name.is_valid():
            raise BadRequest(f"name {go_quote(model)} is invalid", 400)
        with _STORE_LOCK:
            name = existing_name(name)
            try:
                manifest = read_manifest(name)
            except FileNotFoundError:
                return self._error(404, f"model '{model}' not found")
            os.remove(manifest.path)
            prune_directory(manifests_dir())
            remove_manifest_layers(manifest)
        self._send(200, b"", None)


def _zero_keep_alive(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0 <= value < 1
    if isinstance(value, str):
        return bool(re.fullmatch(r"[+-]?0+(\.0*)?([a-zµ]+)?|0", value.strip()))
    return False


def _details(config: dict, parent: str) -> dict:
    return {
        "parent_model": parent,
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": config.get("model_families"),
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


def load_model(name: Name) -> dict:
    """GetModel: what a manifest's layers say. FileNotFoundError when absent."""
    manifest = read_manifest(name)
    model: dict = {
        "manifest": manifest, "config": {}, "model_path": "", "parent": "", "adapters": [], "projectors": [],
        "template": DEFAULT_TEMPLATE, "system": "", "options": {}, "messages": [], "license": [],
    }
    if manifest.config.get("digest"):
        with open(blob_path(manifest.config["digest"]), "rb") as handle:
            model["config"] = json.load(handle)
    for layer in manifest.layers:
        path = blob_path(layer["digest"])
        media = layer.get("mediaType")
        if media == MT_MODEL:
            model["model_path"], model["parent"] = path, layer.get("from", "")
        elif media == MT_ADAPTER:
            model["adapters"].append(path)
        elif media == MT_PROJECTOR:
            model["projectors"].append(path)
        elif media in (MT_TEMPLATE, MT_PROMPT):
            model["template"] = _read_text(path)
        elif media == MT_SYSTEM:
            model["system"] = _read_text(path)
        elif media == MT_PARAMS:
            with open(path, "rb") as handle:
                model["options"] = json.load(handle) or {}
        elif media == MT_MESSAGES:
            with open(path, "rb") as handle:
                model["messages"] = json.load(handle) or []
        elif media == MT_LICENSE:
            model["license"].append(_read_text(path))
    return model


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", errors="replace")


def model_modelfile(model: dict, system: str) -> str:
    """Model.String: the Modelfile `show` prints after its header."""
    lines = [f"FROM {model['model_path']}"]
    lines += [f"ADAPTER {quote_modelfile(path)}" for path in model["adapters"]]
    lines += [f"FROM {path}" for path in model["projectors"]]
    lines.append(f"TEMPLATE {quote_modelfile(model['template'])}")
    if system:
        lines.append(f"SYSTEM {quote_modelfile(system)}")
    for key in sorted(model["options"]):
        value = model["options"][key]
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {quote_modelfile(go_v(item))}")
    lines += [f"LICENSE {quote_modelfile(text)}" for text in model["license"]]
    for message in model["messages"]:
        lines.append(f"MESSAGE {message.get('role', '')} {quote_modelfile(message.get('content', ''))}")
    return "\n".join(lines) + "\n"


def create_events(request: dict, name: Name):
    """CreateHandler's goroutine, as a generator of progress and error objects.

    Errors are {"error": ...} with "status" where ollama gives one. Like ollama,
    a failed `from` does not stop the work: a caller that keeps reading sees
    the model written without base layers (a v0.5.7 bug kept here)."""
    try:
        old_manifest = read_manifest(name)
    except (OSError, ValueError):
        old_manifest = None
    base: list[tuple[dict, dict | None]] = []  # (layer, GGUF kv or None)
    if request.get("from"):
        source = Name.parse(request["from"])
        if not source.is_valid():
            yield {"error": "invalid model name", "status": 400}
            return
        try:
            base = yield from _layers_from_model(source)
        except OllamaError as exc:
            yield {"error": exc.message}
        except (OSError, ValueError) as exc:
            yield {"error": go_os_error(exc) if isinstance(exc, OSError) else str(exc)}
    elif request.get("files") is not None:
        try:
            base = yield from _layers_from_files(request["files"], adapter=False)
        except OllamaError as exc:
            yield {"error": exc.message, **({"status": exc.status} if exc.status else {})}
            return
        except (OSError, ValueError) as exc:
            yield {"error": go_os_error(exc) if isinstance(exc, OSError) else str(exc)}
            return
    else:
        yield {"error": "neither 'from' or 'files' was specified", "status": 400}
        return
    if request.get("adapters") is not None:
        try:
            base += yield from _layers_from_files(request["adapters"], adapter=True)
        except OllamaError as exc:
            yield {"error": exc.message, "status": 400}
            return
        except (OSError, ValueError) as exc:
            yield {"error": go_os_error(exc) if isinstance(exc, OSError) else str(exc), "status": 400}
            return
    try:
        yield from _create_model(request, name, base)
    except OllamaError as exc:
        yield {"error": exc.message, **({"status": exc.status} if exc.status else {})}
        return
    except (OSError, ValueError) as exc:
        yield {"error": str(exc)}
        return
    if not env_bool("OLLAMA_NOPRUNE") and old_manifest is not None:
        remove_manifest_layers(old_manifest)
    yield {"status": "success"}


def _layers_from_model(source: Name):
    try:
        manifest = read_manifest(existing_name(source))
    except FileNotFoundError:
        yield {"status": "pulling manifest"}
        url = f"https://{source.host}/v2/{source.namespace}/{source.model}/manifests/{source.tag}"
        raise OllamaError(f'pull model manifest: Get "{url}": the ollama double does not pull from registries') from None
    layers = []
    for layer in manifest.layers:
        new = new_layer_from_layer(layer["digest"], layer["mediaType"], source.display_shortest())
        kv = read_gguf_kv(blob_path(new["digest"])) if new["mediaType"] in (MT_MODEL, MT_PROJECTOR, MT_ADAPTER) else None
        layers.append((new, kv))
    return layers


def _layers_from_files(files: dict, adapter: bool):
    kind = ""
    for filename, digest in files.items():
        if filename.endswith(".safetensors"):
            kind = "safetensors"
            break
        if filename.endswith(".gguf"):
            kind = "gguf"
            break
        try:
            if is_gguf(blob_path(str(digest))):
                kind = "gguf"
                break
        except (OSError, OllamaError):
            break
    if kind == "safetensors":
        raise OllamaError("the ollama double cannot convert safetensors models")
    if kind != "gguf":
        raise OllamaError("unknown type", 400)
    if not files:
        raise OllamaError("no files provided to convert", 400)
    if adapter and len(files) > 1:
        raise OllamaError("only one adapter is currently supported", 400)
    if CURRENT:
        return (yield from _layers_from_files_current(files))
    layers = []
    for digest in files.values():
        yield {"status": "parsing GGUF"}
        try:
            path = blob_path(str(digest))
        except OllamaError as exc:
            raise OllamaError(exc.message) from None  # no status: ollama answers 500 here
        if not is_gguf(path):
            log("ERROR", "unsupported content type: unknown")
            raise OllamaError("supplied file was not in GGUF format", 400)
        kv = read_gguf_kv(path)
        # ggufLayers (server/model.go): the blob itself is the layer only when
        # the GGUF decodes to exactly its length. Otherwise the decoded part
        # is copied into a new blob and the loop decodes again from there:
        # bytes after the last tensor (llama-gguf-split pads it to 32) are
        # read as the next GGUF's magic, "invalid file magic", or with fewer
        # than 4 bytes left "unexpected EOF"; the copy stays in blobs/.
        # Seen with a real v0.5.7 built from source (2026-12-05).
        decoded = gguf_decoded_length(path)
        size = os.path.getsize(path)
        if decoded is not None and decoded != size:
            new_layer(_file_chunks(path, decoded), kv_media_type(kv))
            with open(path, "rb") as handle:
                handle.seek(decoded)
                magic = handle.read(4)
            if len(magic) < 4:
                raise OllamaError("unexpected EOF")
            if magic not in (b"GGUF", b"FUGG"):
                raise OllamaError("invalid file magic")
            raise OllamaError("invalid file magic")  # a second GGUF in one blob: not followed by the double
        layers.append((new_layer_from_layer(str(digest), kv_media_type(kv), path), kv))
    return layers


# ollama 0.30+ (v0.32.15 server/create.go): files in sorted order, split GGUF
# shards grouped into one model layer, and every model layer rewritten at
# create by llama-quantize COPY into a new blob.
SPLIT_NAME_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")  # create.go:1109


def _split_value(kv: dict, key: str) -> int | None:
    """splitGGUFUint (create.go:1199-1227): `key` or `<arch>.key`."""
    for name in (key, f"{kv_architecture(kv)}.{key}"):
        value = kv.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _split_group_key(layer: dict, kv: dict) -> str | None:
    """splitGGUFGroupKey (create.go:1128-1153)."""
    count = _split_value(kv, "split.count")
    if count is None or count <= 1:
        return None
    source = layer.get("from", "")
    match = SPLIT_NAME_RE.match(source.rsplit("/", 1)[-1])
    if not match or int(match[2]) == 0 or int(match[3]) == 0:
        raise OllamaError(f"split GGUF {go_quote(source)} must use llama.cpp split filename pattern")
    prefix, index, name_count = match[1], int(match[2]) - 1, int(match[3])
    if name_count != count:
        raise OllamaError(f"split GGUF {go_quote(source)} filename count {name_count} does not match metadata count {count}")
    split_no = _split_value(kv, "split.no")
    if split_no is None:
        raise OllamaError(f"split GGUF {go_quote(source)} is missing split.no metadata")
    if split_no != index:
        raise OllamaError(f"split GGUF {go_quote(source)} filename index {index} does not match metadata index {split_no}")
    return f"{layer['mediaType']}:{prefix}:{count}"


def _merge_split_layers(group: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """mergeSplitGGUFLayers (create.go:1155-1197): shard 0's layer, carrying every part."""
    first_layer, first_kv = group[0]
    count = _split_value(first_kv, "split.count") or 0
    if count != len(group):
        raise OllamaError(f"split GGUF {go_quote(first_layer.get('from', ''))} has {len(group)} shards, expected {count}")
    by_index: list = [None] * count
    for layer, kv in group:
        index = _split_value(kv, "split.no")
        if index is None:
            raise OllamaError(f"split GGUF {go_quote(layer.get('from', ''))} is missing split.no metadata")
        if index >= count:
            raise OllamaError(f"split GGUF {go_quote(layer.get('from', ''))} has invalid shard index {index}")
        if by_index[index] is not None:
            raise OllamaError(f"split GGUF has duplicate shard index {index}")
        by_index[index] = (layer, kv)
    if by_index[0] is None:
        raise OllamaError("split GGUF is missing first shard")
    primary, kv = by_index[0]
    primary = dict(primary, parts=[(part[0]["digest"], part[0].get("from", "")) for part in by_index])
    return primary, kv


def go_quote(text: str) -> str:
    """Go's %q for the plain names used here."""
    return json.dumps(text, ensure_ascii=False)


def _layers_from_files_current(files: dict):
    """convertModelFromFilesWithMediaType's GGUF branch (create.go:420-466)."""
    layers: list[tuple[dict, dict]] = []
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for source in sorted(files):
        digest = str(files[source])
        yield {"status": "parsing GGUF"}  # ggufLayersWithMediaType (create.go:1236)
        path = blob_path(digest)
        if not is_gguf(path):
            log("ERROR", "unsupported content type: unknown")
            raise OllamaError("supplied file was not in GGUF format", 400)
        kv = read_gguf_kv(path)
        layer = dict(new_layer_from_layer(digest, kv_media_type(kv), source), rewrite=True)
        key = _split_group_key(layer, kv)
        if key is None:
            layers.append((layer, kv))
        else:
            groups.setdefault(key, []).append((layer, kv))
    for group in groups.values():
        layers.append(_merge_split_layers(group))
    return layers


def _rewrite_with_llama_quantize(layer: dict):
    """copyLayerWithLlamaQuantize / rewriteLayerWithLlamaQuantize (create.go:942-1070,
    server/quantization.go:118-170): split parts hard-linked into blobs/split-gguf-*
    under their own names, `llama-quantize --allow-requantize IN blobs/COPY* COPY`
    with OLLAMA_LLAMA_CPP_COMPAT=0, then the output becomes a new blob. The
    input blobs stay (unreferenced until a prune)."""
    import subprocess

    wrap = "failed to validate GGUF with llama-quantize without compatibility patches: "
    source = blob_path(layer["digest"])
    link_dir = None
    fd, out = tempfile.mkstemp(prefix="COPY", dir=blobs_dir())
    os.close(fd)
    try:
        source_in = source
        if layer.get("parts"):
            link_dir = tempfile.mkdtemp(prefix="split-gguf-", dir=blobs_dir())
            for index, (digest, name) in enumerate(layer["parts"]):
                link = os.path.join(link_dir, name.rsplit("/", 1)[-1])
                os.link(blob_path(digest), link)
                if index == 0:
                    source_in = link
        try:
            binary = find_llama_cpp_binary("llama-quantize")
        except LoadError as exc:
            raise OllamaError(wrap + f"llama-quantize unavailable: {exc.message}") from None
        env = {k: v for k, v in os.environ.items() if k != "OLLAMA_LLAMA_CPP_COMPAT"}
        env["OLLAMA_LLAMA_CPP_COMPAT"] = "0"
        env["LD_LIBRARY_PATH"] = llama_cpp_dir()  # the release's libraries, beside the program
        log("INFO", "quantizing model", type="COPY", input=source_in, output=out)
        process = subprocess.Popen([binary, "--allow-requantize", source_in, out, "COPY"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            with _LOG_LOCK:
                sys.stderr.write(line)
            match = re.search(r"\[\s*(\d+)/\s*(\d+)\]", line)
            if match and int(match[2]) > 0:
                yield {"status": "validating GGUF model", "digest": "0000000000000000000", "total": layer["size"],
                       "completed": layer["size"] * int(match[1]) // int(match[2])}
        code = process.wait()
        if code != 0:
            raise OllamaError(wrap + f"llama-quantize failed: exit status {code}")
        yield {"status": "verifying conversion"}
        new = new_layer(_file_chunks(out, os.path.getsize(out)), layer["mediaType"])
        return new, read_gguf_kv(blob_path(new["digest"]))
    finally:
        os.remove(out)
        if link_dir is not None:
            for entry in os.listdir(link_dir):
                os.remove(os.path.join(link_dir, entry))
            os.rmdir(link_dir)


def _file_chunks(path: str, length: int):
    with open(path, "rb") as handle:
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def _create_model(request: dict, name: Name, base: list):
    config = {
        "model_format": "", "model_family": "", "model_families": None, "model_type": "", "file_type": "",
        "architecture": "amd64", "os": "linux", **({} if CURRENT else {"rootfs": {"type": "layers", "diff_ids": []}}),
    }
    layers: list[dict] = []
    quantize = (request.get("quantize") or request.get("quantization") or "").upper()
    for layer, kv in base:
        if CURRENT and kv is not None and layer.get("rewrite") and layer["mediaType"] == MT_MODEL:
            if quantize:
                raise OllamaError("the ollama double cannot quantize models")
            layer, kv = yield from _rewrite_with_llama_quantize(layer)  # createModel (create.go:765-771)
        if kv is not None:
            if quantize and layer["mediaType"] == MT_MODEL:
                if quantize not in FILE_TYPES or quantize in ("Q4_2", "Q4_3"):
                    raise OllamaError(f"unknown fileType: {quantize}")
                if kv_file_type(kv) not in ("F16", "F32"):
                    raise OllamaError("quantization is only supported for F16 and F32 models")
                if kv_file_type(kv) != quantize:
                    raise OllamaError("the ollama double cannot quantize models")
            config["model_format"] = config["model_format"] or "gguf"
            config["model_family"] = config["model_family"] or kv_architecture(kv)
            config["model_type"] = config["model_type"] or human_number(kv_u64(kv, "general.parameter_count"))
            config["file_type"] = config["file_type"] or kv_file_type(kv)
            config["model_families"] = (config["model_families"] or []) + [kv_architecture(kv)]
        layers.append(layer)

    def replace(media_type: str) -> None:
        for layer in [l for l in layers if l["mediaType"] == media_type]:
            layers.remove(layer)
            try:
                remove_layer_blob(layer["digest"])
            except OSError as exc:
                log("WARN", "couldn't remove blob", digest=layer["digest"], error=str(exc))

    if request.get("template"):
        replace(MT_TEMPLATE)
        layers.append(new_layer_from_bytes(str(request["template"]).encode(), MT_TEMPLATE))
    if request.get("system"):
        replace(MT_SYSTEM)
        layers.append(new_layer_from_bytes(str(request["system"]).encode(), MT_SYSTEM))
    licenses = request.get("license")
    if isinstance(licenses, str):
        licenses = [licenses] if licenses else []
    for text in licenses or []:
        layers.append(new_layer_from_bytes(str(text).encode(), MT_LICENSE))
    params = dict(request.get("parameters") or {})
    for layer in [l for l in layers if l["mediaType"] == MT_PARAMS]:
        with open(blob_path(layer["digest"]), "rb") as handle:
            for key, value in (json.load(handle) or {}).items():
                params.setdefault(key, value)
    if params:
        replace(MT_PARAMS)
        layers.append(new_layer_from_bytes((go_json(go_map(params)) + "\n").encode(), MT_PARAMS))
    if request.get("messages"):
        replace(MT_MESSAGES)
        messages = [{"role": m.get("role", ""), "content": m.get("content", "")} for m in request["messages"]]
        layers.append(new_layer_from_bytes((go_json(messages) + "\n").encode(), MT_MESSAGES))
    if not CURRENT:  # v0.32.15 types/model/config.go has no rootfs
        config["rootfs"]["diff_ids"] = [layer["digest"] for layer in layers]
    config_layer = new_layer_from_bytes((go_json(config) + "\n").encode(), MT_CONFIG)
    for layer in layers:
        if layer.get("status"):
            yield {"status": layer["status"]}
    yield {"status": "writing manifest"}
    write_manifest(name, config_layer, layers)
    return layers


# --------------------------------------------------------------------------
# Options (api/types.go: DefaultOptions, Options.FromMap)

DEFAULT_OPTIONS = {
    "num_predict": -1, "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
    "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.1, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "seed": -1,
    "stop": [], "num_ctx": 2048, "num_batch": 512, "num_gpu": -1, "main_gpu": 0, "num_thread": 0,
    "low_vram": False, "use_mlock": False, "use_mmap": None,
}
# Options that shape the runner process: a change reloads the model (sched.go needsReload).
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "low_vram", "use_mlock", "use_mmap")


def merge_options(model_options: dict, request_options) -> dict:
    """modelOptions: the defaults, then the Modelfile's PARAMETERs, then the request's."""
    options = dict(DEFAULT_OPTIONS)
    for source in (model_options or {}, request_options or {}):
        if not isinstance(source, dict):
            raise BadRequest("json: cannot unmarshal options", 400)
        for key, value in source.items():
            if key not in options:
                log("WARN", "invalid option provided", option=key)
                continue
            options[key] = value
    if isinstance(options["stop"], str):
        options["stop"] = [options["stop"]]
    return options


def parse_go_duration(text: str) -> float | None:
    """time.ParseDuration, in seconds; None when it does not parse."""
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    match = re.fullmatch(r"([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+", text)
    if not match:
        return None
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = sum(float(number) * units[unit] for number, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text))
    return -total if match.group(1) == "-" else total


FOREVER = float("inf")


def env_duration(key: str, default: float) -> float:
    """envconfig.KeepAlive / LoadTimeout: a Go duration or whole seconds; negative is forever."""
    value = env_var(key)
    if not value:
        return default
    seconds = parse_go_duration(value)
    if seconds is None:
        try:
            seconds = float(int(value))
        except ValueError:
            return default
    return FOREVER if seconds < 0 else seconds


def request_keep_alive(value) -> float | None:
    """api.Duration's UnmarshalJSON: a number is seconds, a string a Go duration; negative is forever."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(int(value))  # whole seconds, fractions truncated
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
        if seconds is None:  # a bare "300" is no Go duration
            raise BadRequest(f'time: missing unit in duration "{value}"', 400)
    else:
        raise BadRequest(f"Unsupported type: '{type(value).__name__}'", 400)
    return FOREVER if seconds < 0 else seconds


def available_memory() -> int:
    """discover.GetCPUInfo's free memory on Linux: MemAvailable of /proc/meminfo."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def load_timeout() -> float:
    """envconfig.LoadTimeout: default 5 minutes; zero or negative waits forever."""
    value = env_duration("OLLAMA_LOAD_TIMEOUT", 300.0)
    return FOREVER if value <= 0 else value


def num_parallel() -> int:
    """envconfig.NumParallel; unset on a machine without GPUs, ollama 0.5.7 uses 4,
    0.30+ uses 1 (v0.32.15 envconfig/config.go:275, server/sched.go:497)."""
    try:
        value = int(env_var("OLLAMA_NUM_PARALLEL") or 0)
    except ValueError:
        value = 0
    return value if value > 0 else (1 if CURRENT else 4)


# --------------------------------------------------------------------------
# Templates (template/template.go): the subset of Go's text/template that the
# Modelfile templates builder writes use. Anything else is refused loudly.

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


class TemplateError(OllamaError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with Go's trim markers applied."""
    out: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(text):
        chunk = text[position : match.start()]
        if trim_next:
            chunk = chunk.lstrip(" \t\r\n")
        if match.group(1):
            chunk = chunk.rstrip(" \t\r\n")
        if chunk:
            out.append(("text", chunk))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        trim_next = bool(match.group(3))
        position = match.end()
    chunk = text[position:]
    if trim_next:
        chunk = chunk.lstrip(" \t\r\n")
    if "{{" in chunk:
        raise TemplateError("template: :1: unclosed action")
    if chunk:
        out.append(("text", chunk))
    return out


def parse_template(text: str) -> list:
    """A node list: ("text", s), ("field", path), ("if", [(cond, body)...], else), ("range", path, body, else)."""
    tokens = _tokens(text)
    position = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal position
        nodes: list = []
        while position < len(tokens):
            kind, body = tokens[position]
            position += 1
            if kind == "text":
                nodes.append(("text", body))
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in stop or (word == "else" and "else" in stop):
                return nodes, body
            if word in ("if", "with"):
                branches, otherwise = [], None
                condition = body[len(word):].strip()
                while True:
                    inner, ender = block(("else", "end"))
                    branches.append((condition, inner))
                    if ender == "end":
                        break
                    rest = ender[len("else"):].strip()
                    if rest.startswith("if "):
                        condition = rest[3:].strip()
                        continue
                    otherwise, _ = block(("end",))
                    break
                nodes.append((word, branches, otherwise or []))
            elif word == "range":
                inner, ender = block(("else", "end"))
                otherwise = block(("end",))[0] if ender != "end" else []
                nodes.append(("range", body[len("range"):].strip(), inner, otherwise))
            elif word in ("end", "else"):
                raise TemplateError(f"template: :1: unexpected {{{{{word}}}}}")
            else:
                nodes.append(("expr", body))
        if stop:
            raise TemplateError("template: :1: unexpected EOF")
        return nodes, ""

    nodes, _ = block(())
    return nodes


def template_vars(nodes: list) -> set[str]:
    """Template.Vars: the identifiers used, lowercased."""
    found: set[str] = set()

    def walk(items: list) -> None:
        for node in items:
            if node[0] in ("expr",):
                found.update(w.lower() for w in re.findall(r"\.([A-Za-z_]\w*)", node[1]))
            elif node[0] in ("if", "with"):
                for condition, body in node[1]:
                    found.update(w.lower() for w in re.findall(r"\.([A-Za-z_]\w*)", condition))
                    walk(body)
                walk(node[2])
            elif node[0] == "range":
                found.update(w.lower() for w in re.findall(r"\.([A-Za-z_]\w*)", node[1]))
                walk(node[2])
                walk(node[3])

    walk(nodes)
    return found


def _truthy(value) -> bool:
    return bool(value) if value is not None else False


def _evaluate(expr: str, dot, root):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1].strip()
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expr)
    if not words:
        raise TemplateError("template: :1: missing value for command")
    head, args = words[0], words[1:]
    if head in ("eq", "ne", "and", "or", "not", "len", "json"):
        values = [_evaluate(a, dot, root) for a in args]
        if head == "eq":
            return any(values[0] == v for v in values[1:])
        if head == "ne":
            return values[0] != values[1]
        if head == "and":
            result = True
            for value in values:
                result = value
                if not _truthy(value):
                    break
            return result
        if head == "or":
            result = False
            for value in values:
                result = value
                if _truthy(value):
                    break
            return result
        if head == "not":
            return not _truthy(values[0])
        if head == "len":
            return len(values[0] or [])
        return json.dumps(values[0], separators=(",", ":"), ensure_ascii=False)
    if args:
        raise TemplateError(f"template: :1: the ollama double cannot evaluate {expr!r}")
    if head.startswith('"'):
        return json.loads(head)
    if head == ".":
        return dot
    if head.startswith("$"):
        value, path = root, head[1:]
    elif head.startswith("."):
        value, path = dot, head
    else:
        raise TemplateError(f"template: :1: the ollama double cannot evaluate {expr!r}")
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, dict):
            value = value.get(part, value.get(part.lower(), ""))
        else:
            value = ""
    return value


def render_nodes(nodes: list, dot, root=None) -> str:
    root = dot if root is None else root
    out: list[str] = []
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            value = _evaluate(node[1], dot, root)
            out.append("" if value is None else (value if isinstance(value, str) else json.dumps(value)))
        elif kind in ("if", "with"):
            for condition, body in node[1]:
                value = _evaluate(condition, dot, root)
                if _truthy(value):
                    out.append(render_nodes(body, value if kind == "with" else dot, root))
                    break
            else:
                out.append(render_nodes(node[2], dot, root))
        elif kind == "range":
            items = _evaluate(node[1], dot, root) or []
            if items:
                out.extend(render_nodes(node[2], item, root) for item in items)
            else:
                out.append(render_nodes(node[3], dot, root))
    return "".join(out)


def _cut_after_response(nodes: list) -> list:
    """template.go's deleteNode: drop the {{ .Response }} node and everything after it."""
    cut = False

    def walk(items: list) -> list:
        nonlocal cut
        kept = []
        for node in items:
            if cut:
                break
            if node[0] == "expr" and re.search(r"\.Response\b", node[1]):
                cut = True
                break
            if node[0] in ("if", "with"):
                node = (node[0], [(c, walk(b)) for c, b in node[1]], walk(node[2]))
            elif node[0] == "range":
                node = ("range", node[1], walk(node[2]), walk(node[3]))
            kept.append(node)
        return kept

    return walk(nodes)


class Template:
    """template.Parse: a template without .Messages or .Response gets
    {{ .Response }} appended."""

    def __init__(self, text: str):
        self.raw = text
        self.nodes = parse_template(text)
        self.vars = template_vars(self.nodes)
        if "messages" not in self.vars and "response" not in self.vars:
            self.nodes = self.nodes + [("expr", ".Response")]
            self.vars.add("response")

    def execute(self, messages: list[dict], suffix: str = "", prompt: str = "") -> str:
        """Template.Execute with Values{Messages} (or Prompt and Suffix)."""
        system, collated = collate(messages)
        if prompt and suffix:
            return render_nodes(self.nodes, {"Prompt": prompt, "Suffix": suffix, "Response": ""})
        if "messages" in self.vars:
            return render_nodes(self.nodes, {"System": system, "Messages": collated, "Tools": None, "Response": ""})
        out: list[str] = []
        values = {"System": "", "Prompt": "", "Response": ""}

        def execute() -> None:
            out.append(render_nodes(self.nodes, dict(values)))
            values.update(System="", Prompt="", Response="")

        for message in collated:
            role, content = message["role"], message["content"]
            if role == "system":
                if values["Prompt"] or values["Response"]:
                    execute()
                values["System"] = content
            elif role == "user":
                if values["Response"]:
                    execute()
                values["Prompt"] = content
            elif role == "assistant":
                values["Response"] = content
        out.append(render_nodes(_cut_after_response(self.nodes), dict(values)))
        return "".join(out)


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Consecutive messages of one role merge; every system message is collected."""
    system: list[str] = []
    collated: list[dict] = []
    for message in messages:
        message = {"role": message.get("role", ""), "content": message.get("content", "")}
        if message["role"] == "system":
            system.append(message["content"])
        if collated and collated[-1]["role"] == message["role"]:
            collated[-1]["content"] += "\n\n" + message["content"]
        else:
            collated.append(message)
    return "\n\n".join(system), collated


# --------------------------------------------------------------------------
# The runner (llm/server.go, server/sched.go, runners/common.go)
#
# ollama 0.5.7 runs each model in a runner process (`ollama_llama_server`,
# found under lib/ollama/runners/*/ next to the binary) that it talks to over
# HTTP on loopback: /health, /completion (server-sent "data:" lines with
# content, stop, stopped_limit and timings), /tokenize. Its runner is Go
# around llama.cpp; the double's is llama.cpp's own llama-server, which takes
# the same flags and requests (llm/server.go was written against it).

RUNNER_ERROR_PREFIXES = ("error:", "CUDA error", "cudaMalloc failed", '"ERR"', "error loading model", "GGML_ASSERT",
                         "Deepseek2 does not support K-shift")


class LoadError(OllamaError):
    pass


class ClientGone(Exception):
    """The client closed its connection mid-answer: Go cancels the request's
    context, the runner frees the sequence, the model stays loaded."""


def runners_dir() -> str:
    """runners.Locate: lib/ollama/runners beside or above the executable."""
    exe = os.path.realpath(sys.argv[0])
    for candidate in (os.path.join(os.path.dirname(exe), "..", "lib", "ollama", "runners"),
                      os.path.join(os.path.dirname(exe), "lib", "ollama", "runners")):
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    return ""


def llama_cpp_dir() -> str:
    """ml.LibOllamaPath (v0.32.15 ml/path.go:85-86, llm/llama_binary.go): lib/ollama above the executable."""
    exe = os.path.realpath(sys.argv[0])
    return os.path.normpath(os.path.join(os.path.dirname(exe), "..", "lib", "ollama"))


def find_llama_cpp_binary(name: str) -> str:
    path = os.path.join(llama_cpp_dir(), name)
    if os.access(path, os.X_OK):
        return path
    raise LoadError(f"{name} binary not found (checked: {path}). Run 'cmake -S llama/server --preset cpu && cmake --build --preset cpu' first", 500)


def runner_binary() -> str:
    if CURRENT:
        return find_llama_cpp_binary("llama-server")
    directory = runners_dir()
    for variant in sorted(os.listdir(directory)) if directory else []:
        path = os.path.join(directory, variant, "ollama_llama_server")
        if os.access(path, os.X_OK):
            return path
    raise LoadError("unable to locate runner: no ollama_llama_server under lib/ollama/runners", 500)


class Runner:
    """One loaded model: a runner process on a loopback port."""

    def __init__(self, model: dict, name: Name, options: dict):
        self.model_path = model["model_path"]
        self.name = name
        self.digest = model["manifest"].digest
        self.options = {key: options[key] for key in RUNNER_OPTIONS}
        self.parallel = num_parallel()
        self.size = os.path.getsize(self.model_path)
        self.expires_at = 0.0  # monotonic; FOREVER never expires
        self.expires_wall = 0.0
        self.busy = 0
        self.last_error = ""
        self.process = None
        self.port = 0
        self.lock = threading.Lock()
        self.loading = True
        self.ready = threading.Event()  # set when the load ended, loaded or not
        self.load_error: OllamaError | None = None
        # What the load timer watches: the progress llama.cpp's load reports
        # (0.5.7's runner serves it on /health) and when the runner last
        # wrote anything (0.30+).
        self.progress = 0.0
        self.activity = 0.0
        self.session: float | None = None  # the loading request's keep_alive

    def command(self, binary: str) -> list[str]:
        """NewLlamaServer's params."""
        opts = self.options
        if CURRENT:
            # v0.32.15 llm/llama_server.go:369-420, less what b4610's llama-server
            # (the double's runner) does not know: --no-webui, --offline,
            # --log-verbosity, --no-log-prefix/--no-log-timestamps, --flash-attn VALUE.
            argv = [binary, "--model", self.model_path, "--port", str(self.port), "--host", "127.0.0.1",
                    "-c", str(int(opts["num_ctx"]) * self.parallel), "-np", str(self.parallel)]
            if int(opts["num_batch"]) > 0:
                argv += ["-b", str(int(opts["num_batch"])), "-ub", str(int(opts["num_batch"]))]
            if int(opts["num_gpu"]) >= 0:
                argv += ["-ngl", "0"]  # no GPU here: the layers asked for run on the CPU
            if int(opts["num_thread"]) > 0:
                argv += ["-t", str(int(opts["num_thread"]))]
            if opts["use_mmap"] is False:  # appendLoadModeArgs (llama_server.go:634): --load-mode none, which b4610 calls --no-mmap
                argv.append("--no-mmap")
            return argv
        argv = [binary, "--model", self.model_path, "--ctx-size", str(int(opts["num_ctx"]) * self.parallel),
                "--batch-size", str(int(opts["num_batch"])), "--n-gpu-layers", "0"]
        if int(opts["num_thread"]) > 0:
            argv += ["--threads", str(int(opts["num_thread"]))]
        # llm/server.go:247-255: --no-mmap for a CPU load unless use_mmap is
        # set (the double has no GPU), when free RAM is below the model, or
        # when use_mmap is false.
        if opts["use_mmap"] is not True or available_memory() < self.size:
            argv.append("--no-mmap")
        if opts["use_mlock"]:
            argv.append("--mlock")
        # ollama's Go runner makes no warm-up decode (llama/runner/runner.go
        # loads the model and serves); llama-server does one unless told not to.
        return argv + ["--parallel", str(self.parallel), "--port", str(self.port), "--no-warmup"]

    def start(self, hung_up=lambda: False) -> float:
        """Start the runner and wait until it answers (WaitUntilRunning); return the load time.

        OLLAMA_LOAD_TIMEOUT is a stall timer, as in llm/server.go: v0.5.7
        (WaitUntilRunning, lines 550-611) pushes the deadline out whenever
        the runner's load progress changes and once more when it reaches
        100 %; v0.32.15 (llm/llama_server.go:1281-1356) whenever llama-server
        wrote output (memoryParsingWriter notes load activity) or its status
        turned to loading. A client that hangs up aborts the load (the
        request's context is done)."""
        import subprocess

        binary = runner_binary()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        if CURRENT:  # v0.32.15 llm/llama_server.go:442-522: the server's folder first
            env["LD_LIBRARY_PATH"] = os.pathsep.join([os.path.dirname(binary)] + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else []))
        else:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([os.path.dirname(binary), os.path.dirname(runners_dir())])
        argv = self.command(binary)
        log("INFO", "starting llama server", cmd=" ".join(argv))
        started = time.monotonic()
        self.activity = started
        # llm/llm_linux.go (0.5.7 and 0.32.15): LlamaServerSysProcAttr is an empty
        # SysProcAttr, so the runner stays in ollama's process group and session:
        # whoever signals ollama's group (the supervisor, after ollama died) reaches it.
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        threading.Thread(target=self._status_writer, daemon=True).start()
        stall = load_timeout()
        deadline = started + stall
        prior, seen_activity, fully_loaded = self.progress, self.activity, False
        log("INFO", "waiting for llama-server to start responding" if CURRENT else "waiting for llama runner to start responding")
        while True:
            if hung_up():
                self.stop()
                if CURRENT:
                    log("WARN", "client connection closed before llama-server finished loading, aborting load")
                    raise LoadError("timed out waiting for llama-server to start: context canceled", 500)
                log("WARN", "client connection closed before server finished loading, aborting load")
                raise LoadError("timed out waiting for llama runner to start: context canceled", 500)
            code = self.process.poll()
            if code is not None:
                self.process.wait()
                time.sleep(0.05)  # the status writer's last lines
                detail = self.last_error or f"exit status {code}"
                if "unknown model" in self.last_error:
                    detail = "this model is not supported by your version of Ollama. You may need to upgrade"
                if CURRENT:  # v0.32.15 llm/llama_server.go:1304-1325
                    tail = f": {self.last_error}" if self.last_error else ""
                    raise LoadError(f"llama-server process has terminated: exit status {code}{tail}", 500)
                raise LoadError(f"llama runner process has terminated: {detail}", 500)
            if CURRENT and self.activity > seen_activity:
                seen_activity = self.activity
                deadline = seen_activity + stall
            if time.monotonic() > deadline:
                self.stop()
                if CURRENT:  # v0.32.15 llm/llama_server.go:1334-1336
                    raise LoadError(f"timed out waiting for llama-server to start - {self.last_error}", 500)
                raise LoadError(f"timed out waiting for llama runner to start - progress {self.progress:0.2f} - {self.last_error}", 500)
            try:
                status, _ = self._http("GET", "/health", None, timeout=0.2)
                if status == 200:
                    took = time.monotonic() - started
                    if CURRENT:
                        log("INFO", f"llama-server started in {took:0.2f} seconds")
                    else:
                        log("INFO", f"llama runner started in {took:0.2f} seconds")
                    return took
            except OSError:
                pass
            if not CURRENT:
                self.progress = self._load_progress("--no-mmap" not in argv)
                if self.progress != prior:
                    prior = self.progress
                    log("DEBUG", f"model load progress {self.progress:0.2f}")
                    deadline = time.monotonic() + stall
                elif not fully_loaded and int(self.progress * 100.0) >= 100:
                    log("DEBUG", "model load completed, waiting for server to become available")
                    deadline = time.monotonic() + stall
                    fully_loaded = True
            time.sleep(0.25)

    def _status_writer(self) -> None:
        """StatusWriter: the runner's output goes to ours; the last error line
        is kept. Read as it comes, not by lines: 0.30+ counts any output as
        load activity."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 32 * 1024)  # io.Copy's buffer
            except OSError:
                break
            if not chunk:
                break
            self.activity = time.monotonic()
            self._runner_output(chunk.decode("utf-8", "replace"))

    def _load_progress(self, mapped: bool) -> float:
        """What ollama 0.5.7's runner reports on /health: llama.cpp's load
        progress callback, the share of the tensor data loaded
        (llama_model_loader::load_all_data). llama-server does not serve it,
        so the double measures the same bytes on its runner process:
        --no-mmap reads each tensor with read() (rchar). With mmap, the
        file is mapped with MAP_POPULATE (llama/llama-mmap.cpp:302) before
        load_all_data: the progress stays 0 while the mapping fills, then
        the CPU tensors are placed without a read and it is 1."""
        pid = self.process.pid if self.process is not None else 0
        try:
            if not mapped:
                with open(f"/proc/{pid}/io", encoding="ascii") as handle:
                    done = next(int(line.split()[1]) for line in handle if line.startswith("rchar:"))
                return max(self.progress, min(1.0, done / max(self.size, 1)))
            inside, resident = False, 0
            with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    fields = line.split(None, 5)
                    if fields and "-" in fields[0] and not fields[0].endswith(":"):
                        inside = len(fields) == 6 and fields[5].strip() == self.model_path
                    elif inside and line.startswith("Rss:"):
                        resident += int(fields[1]) * 1024
            return 1.0 if resident >= self.size - 4096 else self.progress
        except (OSError, ValueError, StopIteration):
            return self.progress

    def _runner_output(self, text: str) -> None:
        """llm/status.go StatusWriter.Write: each chunk written (not each line)
        is searched for an error prefix; the last prefix found wins and the
        message is the rest of the chunk, trimmed (so it can span lines)."""
        for prefix in RUNNER_ERROR_PREFIXES:
            head, sep, after = text.partition(prefix)
            if sep:
                self.last_error = prefix + after.strip()
        with _LOG_LOCK:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _http(self, method: str, path: str, payload, timeout: float = 600):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            body = None if payload is None else json.dumps(payload, ensure_ascii=False).encode()
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tokenize(self, text: str) -> list[int]:
        """llmServer.Tokenize: no BOS, special tokens parsed."""
        status, body = self._http("POST", "/tokenize", {"content": text, "add_special": False})
        if status != 200:
            raise OllamaError(body.decode("utf-8", "replace"), 500)
        return json.loads(body)["tokens"]

    def completion(self, prompt: str, options: dict, on_piece) -> dict:
        """llmServer.Completion: stream pieces to on_piece; return the final metrics."""
        num_predict = int(options["num_predict"])
        total_ctx = int(self.options["num_ctx"]) * self.parallel
        if num_predict < 0 or num_predict > 10 * total_ctx:
            num_predict = 10 * total_ctx
        request = {
            "prompt": prompt, "stream": True, "n_predict": num_predict, "n_keep": options["num_keep"],
            "temperature": options["temperature"], "top_k": options["top_k"], "top_p": options["top_p"],
            "min_p": options["min_p"], "typical_p": options["typical_p"], "repeat_last_n": options["repeat_last_n"],
            # llama/llama.go NewSamplingContext (0.5.7) passes the frequency
            # penalty as the presence penalty too: presence_penalty is ignored.
            "repeat_penalty": options["repeat_penalty"], "presence_penalty": options["frequency_penalty"],
            "frequency_penalty": options["frequency_penalty"], "mirostat": options["mirostat"],
            "mirostat_tau": options["mirostat_tau"], "mirostat_eta": options["mirostat_eta"],
            "seed": options["seed"], "stop": options["stop"], "cache_prompt": True,
        }
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        try:
            connection.request("POST", "/completion", body=json.dumps(request, ensure_ascii=False).encode(),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status >= 400:
                raise OllamaError(response.read().decode("utf-8", "replace"), 500)
            for raw in response:
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b"data: "):
                    line = line[len(b"data: "):]
                event = json.loads(line)
                if event.get("content"):
                    try:
                        on_piece(event["content"])
                    except OSError as exc:  # writing to our client, not reading the runner
                        raise ClientGone() from exc
                if event.get("stop"):
                    timings = event.get("timings") or {}
                    limit = event.get("stopped_limit", event.get("stop_type") == "limit")
                    return {
                        "done_reason": "length" if limit else "stop",
                        "prompt_eval_count": int(timings.get("prompt_n", 0)),
                        "prompt_eval_duration": int(float(timings.get("prompt_ms", 0)) * 1e6),
                        "eval_count": int(timings.get("predicted_n", 0)),
                        "eval_duration": int(float(timings.get("predicted_ms", 0)) * 1e6),
                    }
        except (OSError, http.client.HTTPException) as exc:
            self.stop()
            raise OllamaError(f"an error was encountered while running the model: {self.last_error or exc}", 500) from None
        finally:
            connection.close()
        raise OllamaError("an error was encountered while running the model: unexpected EOF", 500)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a runner that ignores SIGTERM
                self.process.kill()
                self.process.wait()


class Scheduler:
    """server/sched.go, reduced: one runner per model, reloaded when the
    runner options change, unloaded when keep_alive runs out."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runners: dict[str, Runner] = {}
        threading.Thread(target=self._reaper, daemon=True).start()

    def acquire(self, name: Name, model: dict, options: dict, keep_alive: float | None,
                hung_up=lambda: False) -> tuple[Runner, float]:
        """GetRunner: a loaded runner for the model (loading it if need be) and
        the load time. A loading runner is listed in /api/ps (sched.go adds it
        to s.loaded before WaitUntilRunning); a second request for it waits
        for that load. A failed load is expired, its runner stopped."""
        key = model["model_path"]
        with self.lock:
            runner = self.runners.get(key)
            wanted = {k: options[k] for k in RUNNER_OPTIONS}
            if runner is not None and not runner.loading and (not runner.alive() or runner.options != wanted):
                runner.stop()
                self.runners.pop(key, None)
                runner = None
            mine = runner is None
            if mine:
                check_loadable_by_ollama(model["model_path"])
                limit = int(env_var("OLLAMA_MAX_LOADED_MODELS") or 0)
                if limit > 0:  # sched.go: make room by unloading idle runners (the double does not queue)
                    for other_key, other in list(self.runners.items()):
                        if len(self.runners) < limit:
                            break
                        if other.busy == 0 and not other.loading:
                            other.stop()
                            del self.runners[other_key]
                runner = Runner(model, name, options)
                runner.session = keep_alive
                self.runners[key] = runner
            runner.busy += 1
        took = 0.0
        if mine:
            try:
                took = runner.start(hung_up)
            except OllamaError as exc:
                log("ERROR", "error loading llama server", error=exc.message)
                runner.load_error = exc
                with self.lock:
                    runner.busy -= 1
                    if self.runners.get(key) is runner:
                        del self.runners[key]
                runner.stop()
                runner.ready.set()
                raise
            runner.loading = False
            runner.ready.set()
        else:
            while not runner.ready.wait(0.25):
                if hung_up():
                    with self.lock:
                        runner.busy -= 1
                    raise LoadError("context canceled", 500)
            if runner.load_error is not None:
                with self.lock:
                    runner.busy -= 1
                raise runner.load_error
        with self.lock:
            self._set_expiry(runner, keep_alive)
        return runner, took

    def release(self, runner: Runner, keep_alive: float | None) -> None:
        with self.lock:
            runner.busy -= 1
            self._set_expiry(runner, keep_alive)

    @staticmethod
    def _set_expiry(runner: Runner, keep_alive: float | None) -> None:
        seconds = env_duration("OLLAMA_KEEP_ALIVE", 300.0) if keep_alive is None else keep_alive
        runner.expires_at = FOREVER if seconds == FOREVER else time.monotonic() + seconds
        runner.expires_wall = FOREVER if seconds == FOREVER else time.time() + seconds

    def expire(self, model_path: str) -> None:
        with self.lock:
            runner = self.runners.get(model_path)
            if runner is not None:
                runner.expires_at, runner.expires_wall = 0.0, time.time()
        self._reap()

    def _reap(self) -> None:
        with self.lock:
            for key, runner in list(self.runners.items()):
                if runner.busy == 0 and not runner.loading and (runner.expires_at <= time.monotonic() or not runner.alive()):
                    log("DEBUG", "runner expired", model=runner.model_path)
                    runner.stop()
                    del self.runners[key]

    def _reaper(self) -> None:
        while True:
            time.sleep(0.2)
            self._reap()

    def loaded(self) -> list[Runner]:
        """s.sched.loaded. v0.5.7 adds a runner before WaitUntilRunning, so a
        loading one is listed; v0.32.15 adds it only after llama.Load returned
        (server/sched.go:627 and 727), and llamaServerRunner.Load waits until
        llama-server runs (llm/llama_server.go:1047-1050): not while loading."""
        with self.lock:
            return [r for r in self.runners.values() if (r.loading and not CURRENT) or (not r.loading and r.alive())]

    def stop_all(self) -> None:
        with self.lock:
            for runner in self.runners.values():
                runner.stop()
            self.runners.clear()


SCHEDULER: Scheduler | None = None


def scheduler() -> Scheduler:
    global SCHEDULER
    if SCHEDULER is None:
        SCHEDULER = Scheduler()
    return SCHEDULER


def check_loadable_by_ollama(path: str) -> None:
    """What ollama 0.5.7 does with the GGUF before starting a runner
    (llm.LoadModel, then EstimateGPULayers -> GGML.GraphSize): a file whose
    header does not decode is an error; one without tokenizer.ggml.tokens
    makes GraphSize panic, which takes the whole server down (exit 2)."""
    kv = read_gguf_kv(path)
    if "general.architecture" not in kv:
        raise LoadError("unable to load model: " + path, 500)
    if "tokenizer.ggml.tokens" not in kv:
        with _LOG_LOCK:
            sys.stderr.write(
                "panic: interface conversion: interface {} is nil, not *llm.array\n\n"
                "goroutine 1 [running]:\ngithub.com/ollama/ollama/llm.GGML.GraphSize(...)\n"
                "github.com/ollama/ollama/llm.EstimateGPULayers(...)\n"
            )
            sys.stderr.flush()
        os._exit(2)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def shutdown_request(self, request) -> None:
        # Like Go's server after a handler left the body unread: close the write
        # side, let the client read the answer, then drop the connection.
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.2)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and request.recv(CHUNK):
                pass
        except OSError:
            pass
        self.close_request(request)


GIN_ROUTES = [
    ("POST", "/api/pull", "PullHandler-fm", 5), ("POST", "/api/generate", "GenerateHandler-fm", 5),
    ("POST", "/api/chat", "ChatHandler-fm", 5), ("POST", "/api/embed", "EmbedHandler-fm", 5),
    ("POST", "/api/embeddings", "EmbeddingsHandler-fm", 5), ("POST", "/api/create", "CreateHandler-fm", 5),
    ("POST", "/api/push", "PushHandler-fm", 5), ("POST", "/api/copy", "CopyHandler-fm", 5),
    ("DELETE", "/api/delete", "DeleteHandler-fm", 5), ("POST", "/api/show", "ShowHandler-fm", 5),
    ("POST", "/api/blobs/:digest", "CreateBlobHandler-fm", 5), ("HEAD", "/api/blobs/:digest", "HeadBlobHandler-fm", 5),
    ("GET", "/api/ps", "PsHandler-fm", 5), ("POST", "/v1/chat/completions", "ChatHandler-fm", 6),
    ("POST", "/v1/completions", "GenerateHandler-fm", 6), ("POST", "/v1/embeddings", "EmbedHandler-fm", 6),
    ("GET", "/v1/models", "ListHandler-fm", 6), ("GET", "/v1/models/:model", "ShowHandler-fm", 6),
    ("GET", "/", "GenerateRoutes.func1", 5), ("GET", "/api/tags", "ListHandler-fm", 5),
    ("GET", "/api/version", "GenerateRoutes.func2", 5), ("HEAD", "/", "GenerateRoutes.func1", 5),
    ("HEAD", "/api/tags", "ListHandler-fm", 5), ("HEAD", "/api/version", "GenerateRoutes.func2", 5),
]


def initialize_keypair() -> None:
    """cmd/cmd.go initializeKeypair: a key pair in ~/.ollama, announced on
    stdout when it is made. (The double's key is a placeholder, not ed25519.)"""
    home = os.path.expanduser("~")
    private = os.path.join(home, ".ollama", "id_ed25519")
    if os.path.exists(private):
        return
    print(f"Couldn't find '{private}'. Generating new private key.")
    os.makedirs(os.path.dirname(private), mode=0o755, exist_ok=True)
    public = "ssh-ed25519 " + __import__("base64").b64encode(os.urandom(51)).decode() + "\n"
    with open(private, "w", encoding="ascii") as handle:
        handle.write("-----BEGIN OPENSSH PRIVATE KEY-----\n(the ollama double's placeholder)\n-----END OPENSSH PRIVATE KEY-----\n")
    os.chmod(private, 0o600)
    with open(private + ".pub", "w", encoding="ascii") as handle:
        handle.write(public)
    print(f"Your new public key is: \n\n{public}")
    sys.stdout.flush()


def gin_debug_routes() -> None:
    """What gin prints to stdout when ollama 0.5.7 builds its routes. The
    GIN_MODE variable does not silence it: server/routes.go pins gin's mode
    in its init (var mode = gin.DebugMode), after gin read the variable."""
    print("[GIN-debug] [WARNING] Creating an Engine instance with the Logger and Recovery middleware already attached.\n")
    print('[GIN-debug] [WARNING] Running in "debug" mode. Switch to "release" mode in production.\n'
          " - using env:\texport GIN_MODE=release\n - using code:\tgin.SetMode(gin.ReleaseMode)\n")
    for method, path, handler, count in GIN_ROUTES:
        print(f"[GIN-debug] {method:<6} {path:<25} --> github.com/ollama/ollama/server.(*Server).{handler} ({count} handlers)")
    sys.stdout.flush()


def serve() -> int:
    _scheme, host, port = ollama_host()
    initialize_keypair()
    log("INFO", DOUBLE_NOTE)
    log("INFO", "server config", env=f"map[OLLAMA_HOST:{env_var('OLLAMA_HOST')} OLLAMA_MODELS:{models_dir()} OLLAMA_NOPRUNE:{str(env_bool('OLLAMA_NOPRUNE')).lower()}]")
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), Handler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"Error: listen tcp {join_host_port(host, port)}: bind: {reason[:1].lower() + reason[1:]}", file=sys.stderr)
        return 1
    def stop(signum, _frame) -> None:
        log("INFO", f"ollama double: {signal.Signals(signum).name} received, shutting down")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)  # before pruning: serve_forever then returns at once
    signal.signal(signal.SIGINT, stop)
    try:
        directory = blobs_dir()
        fix_blobs(directory)
        if not env_bool("OLLAMA_NOPRUNE"):
            try:
                list_manifests(False)
            except OllamaError as exc:
                log("WARN", "corrupt manifests detected, skipping prune operation.  Re-pull or delete to clear", error=exc.message)
            else:
                prune_layers()
                prune_directory(manifests_dir())
    except OSError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        server.server_close()
        return 1

    gin_debug_routes()
    bound = server.server_address
    log("INFO", f"Listening on {join_host_port(bound[0], bound[1])} (version {VERSION})")
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    if SCHEDULER is not None:
        SCHEDULER.stop_all()
    return 0


# --------------------------------------------------------------------------
# Client (cmd/cmd.go, api/client.go)


class Client:
    def __init__(self):
        self.scheme, host, self.port = ollama_host()
        self.host = host or "127.0.0.1"
        self.base = f"{self.scheme}://{join_host_port(self.host, self.port)}"

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, blocksize=CHUNK)

    def _headers(self, accept: str = "application/json") -> dict:
        return {"Content-Type": "application/json", "Accept": accept, "User-Agent": f"ollama/{VERSION} (ollama double) Python/{sys.version.split()[0]}"}

    def _fail(self, method: str, path: str, exc: Exception) -> OllamaError:
        return OllamaError(f'{method.title()} "{self.base}{path}": {exc}')

    @staticmethod
    def _check(response: http.client.HTTPResponse, body: bytes) -> None:
        """checkError: the JSON error's message, else the body."""
        if response.status < 400:
            return
        try:
            message = json.loads(body).get("error") or ""
        except (ValueError, AttributeError):
            message = body.decode("utf-8", errors="replace")
        if not message:  # api.StatusError with neither Status nor ErrorMessage (a HEAD's empty 401, say)
            message = "something went wrong, please see the ollama server logs for details"
        raise OllamaError(message, response.status)

    def do(self, method: str, path: str, payload=None) -> dict | None:
        connection = self._connection()
        try:
            body = None if payload is None else go_json(payload).encode()
            connection.request(method, path, body=body, headers=self._headers())
            response = connection.getresponse()
            data = response.read()
        except OSError as exc:
            raise self._fail(method, path, exc) from exc
        finally:
            connection.close()
        self._check(response, data)
        return json.loads(data) if data.strip() else None

    def stream(self, method: str, path: str, payload, callback) -> None:
        connection = self._connection()
        try:
            connection.request(method, path, body=go_json(payload).encode(), headers=self._headers("application/x-ndjson"))
            response = connection.getresponse()
            for line in response:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise OllamaError(f"unmarshal: {exc}") from None
                if isinstance(value, dict) and value.get("error"):
                    raise OllamaError(str(value["error"]))
                if response.status >= 400:
                    raise OllamaError(f"{response.status} {response.reason}")
                callback(value)
        except OSError as exc:
            raise self._fail(method, path, exc) from exc
        finally:
            connection.close()

    def heartbeat(self) -> None:
        """checkServerHeartbeat: HEAD /; a refused connection is "could not connect"."""
        try:
            self.do("HEAD", "/")
        except OllamaError as exc:
            if isinstance(exc.__cause__, ConnectionRefusedError) or " refused" in exc.message:
                raise OllamaError("could not connect to ollama app, is it running?") from None
            raise

    def create_blob(self, digest: str, path: str) -> None:
        """client.CreateBlob: POST the file's bytes (streamed, no HEAD first)."""
        url = f"/api/blobs/{digest}"
        connection = self._connection()
        try:
            size = os.path.getsize(path)
            connection.putrequest("POST", url)
            for key, value in self._headers().items():
                connection.putheader(key, value)
            connection.putheader("Content-Length", str(size))
            connection.endheaders()
            sock = connection.sock
            with open(path, "rb") as handle:
                while True:
                    # ollama answers 200 at once, unread, for a blob it has: stop sending then
                    if select.select([sock], [], [], 0)[0]:
                        break
                    chunk = handle.read(CHUNK)
                    if not chunk:
                        break
                    try:
                        sock.sendall(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break
            response = connection.getresponse()
            data = response.read()
        except OSError as exc:
            raise self._fail("POST", url, exc) from exc
        finally:
            connection.close()
        self._check(response, data)


def _cli_error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 1


def _parse_flags(args: list[str], spec: dict[str, tuple[str | None, bool]]) -> tuple[dict, list[str]]:
    """A small cobra: spec maps a long flag to (short letter, takes a value)."""
    shorts = {short: long for long, (short, _) in spec.items() if short}
    values: dict = {}
    positional: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            positional += args[index:]
            break
        if arg.startswith("--") and len(arg) > 2:
            long, eq, inline = arg[2:].partition("=")
            if long not in spec:
                raise OllamaError(f"unknown flag: --{long}")
        elif arg.startswith("-") and len(arg) > 1:
            letter = arg[1]
            if letter not in shorts:
                raise OllamaError(f"unknown shorthand flag: '{letter}' in {arg}")
            long = shorts[letter]
            rest = arg[2:]
            eq, inline = ("=", rest[1:]) if rest.startswith("=") else ("=" if rest else "", rest)
        else:
            positional.append(arg)
            continue
        if spec[long][1]:
            if not eq:
                if index >= len(args):
                    raise OllamaError(f"flag needs an argument: --{long}")
                inline = args[index]
                index += 1
            values[long] = inline
        else:
            values[long] = True if not eq else parse_go_bool(inline) is True
    return values, positional


def _exact_args(positional: list[str], count: int) -> None:
    if len(positional) != count:
        raise OllamaError(f"accepts {count} arg(s), received {len(positional)}")


def cmd_create(args: list[str]) -> int:
    flags, positional = _parse_flags(args, {"file": ("f", True), "quantize": ("q", True), "help": ("h", False)})
    _exact_args(positional, 1)
    client = Client()
    client.heartbeat()
    filename = flags.get("file") or "Modelfile"
    absolute = os.path.abspath(filename)
    if os.path.exists(absolute):
        with open(absolute, "rb") as handle:
            text, relative_dir = decode_modelfile(handle.read()), os.path.dirname(absolute)
    else:
        # getModelfileName returns "" for a missing file (-f or not): ollama then builds "FROM ."
        text, relative_dir = "FROM .\n", "."
    commands = parse_modelfile(text)
    status = "gathering model components"
    _progress(status)
    request = create_request(commands, relative_dir)
    request = {"model": "", **request, "name": positional[0]}
    if flags.get("quantize"):
        request["quantize"] = flags["quantize"]
    for key in ("files", "adapters"):
        if request.get(key):
            by_name = {}
            for path, digest in request[key].items():
                _progress(f"copying file {digest} 0%")
                client.create_blob(digest, os.path.realpath(path))
                _progress(f"copying file {digest} 100%")
                by_name[os.path.basename(path)] = digest
            request[key] = by_name
    for key in ("files", "adapters", "parameters"):
        if key in request:
            request[key] = go_map(request[key])
    ordered = {k: request[k] for k in ("model", "quantize", "from", "files", "adapters", "template", "license", "system", "parameters", "messages", "name") if k in request}
    last = [status]

    def show(event: dict) -> None:
        if event.get("digest"):
            _progress(f"pulling {event['digest'][7:19]}...")
        elif event.get("status") != last[0]:
            last[0] = event.get("status", "")
            _progress(last[0])

    try:
        client.stream("POST", "/api/create", ordered, show)
    except OllamaError as exc:
        if "path or Modelfile are required" in exc.message:
            raise OllamaError("the ollama server must be updated to use `ollama create` with this client") from None
        raise
    return 0


def _progress(status: str) -> None:
    """ollama draws spinners on stderr; the double writes one line per status."""
    print(status, file=sys.stderr, flush=True)


def _table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """tablewriter as ollama sets it up: no borders, left aligned, four spaces after each cell."""
    every = ([header] if header else []) + rows
    if not every:
        return ""
    widths = [max(len(row[i]) if i < len(row) else 0 for row in every) for i in range(max(map(len, every)))]
    lines = []
    for row in every:
        lines.append("".join((row[i] if i < len(row) else "").ljust(widths[i]) + "    " for i in range(len(widths))))
    return "\n".join(lines) + "\n"


def cmd_list(args: list[str]) -> int:
    _flags, positional = _parse_flags(args, {"help": ("h", False)})
    client = Client()
    client.heartbeat()
    models = (client.do("GET", "/api/tags") or {}).get("models") or []
    rows = []
    for model in models:
        name = model.get("name", "")
        if not positional or name.lower().startswith(positional[0].lower()):
            rows.append([name, str(model.get("digest", ""))[:12], human_bytes(int(model.get("size") or 0)),
                         human_time(parse_go_time(model.get("modified_at", "")))])
    sys.stdout.write(_table(rows, ["NAME", "ID", "SIZE", "MODIFIED"]))
    return 0


def cmd_show(args: list[str]) -> int:
    kinds = ("license", "modelfile", "parameters", "system", "template")
    flags, positional = _parse_flags(args, {**{kind: (None, False) for kind in kinds}, "help": ("h", False)})
    _exact_args(positional, 1)
    client = Client()
    client.heartbeat()
    chosen = [kind for kind in kinds if flags.get(kind)]
    if len(chosen) > 1:
        raise OllamaError("only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified")
    response = client.do("POST", "/api/show", {"model": "", "system": "", "template": "", "verbose": False, "options": None, "name": positional[0]}) or {}
    if chosen:
        kind = chosen[0]
        text = response.get(kind, "")
        sys.stdout.write(text + ("\n" if kind in ("license", "modelfile", "parameters") else ""))
        return 0
    details = response.get("details") or {}
    info = response.get("model_info")
    out = ["  Model"]
    rows: list[list[str]] = []
    if info and isinstance(info.get("general.architecture"), str):
        arch = info["general.architecture"]
        rows.append(["", "architecture", arch])
        rows.append(["", "parameters", human_number(int(info.get("general.parameter_count") or 0))])
        for label, key in (("context length", f"{arch}.context_length"), ("embedding length", f"{arch}.embedding_length")):
            rows.append(["", label, go_v(info.get(key, 0))])
    else:
        rows.append(["", "architecture", details.get("family", "")])
        rows.append(["", "parameters", details.get("parameter_size", "")])
    rows.append(["", "quantization", details.get("quantization_level", "")])
    out.append(_table(rows))
    if response.get("parameters"):
        out += ["  Parameters", _table([[""] + line.split() for line in response["parameters"].splitlines() if line])]
    for title, key in (("System", "system"), ("License", "license")):
        if response.get(key):
            lines = [line.strip() for line in response[key].splitlines() if line][:2]
            out += [f"  {title}", _table([["", line] for line in lines])]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_rm(args: list[str]) -> int:
    _flags, positional = _parse_flags(args, {"help": ("h", False)})
    if not positional:
        raise OllamaError("requires at least 1 arg(s), only received 0")
    client = Client()
    client.heartbeat()
    try:  # ollama unloads a running model first; "not found" is fine there
        client.do("POST", "/api/generate", {"model": positional[0], "keep_alive": 0})
    except OllamaError as exc:
        if "not found" not in exc.message:
            raise OllamaError(f'unable to stop existing running model "{positional[0]}": {exc.message}') from None
    for name in positional:
        client.do("DELETE", "/api/delete", {"model": "", "name": name})
        print(f"deleted '{name}'")
    return 0


def cmd_run(args: list[str]) -> int:
    """RunHandler, non-interactive: `ollama run MODEL PROMPT...` (or the prompt
    on stdin) streams the answer to stdout; --verbose adds the timings."""
    flags, positional = _parse_flags(args, {"help": ("h", False), "verbose": (None, False), "keepalive": (None, True),
                                             "nowordwrap": (None, False), "format": (None, True), "insecure": (None, False)})
    if not positional:
        raise OllamaError("requires at least 1 arg(s), only received 0")
    model, prompts = positional[0], positional[1:]
    if not sys.stdin.isatty():  # cmd.go:290-300: stdin is prepended, even when empty
        prompts = [sys.stdin.read()] + prompts
    prompt = " ".join(prompts)
    if not prompt:
        raise OllamaError("the ollama double runs only with a prompt (no interactive mode)")
    client = Client()
    client.heartbeat()
    client.do("POST", "/api/show", {"model": model})
    request: dict = {"model": model, "prompt": prompt, "context": [], "options": {}}
    if flags.get("keepalive"):
        request["keep_alive"] = flags["keepalive"]
    if flags.get("format"):
        request["format"] = flags["format"]
    last: dict = {}

    def show(event: dict) -> None:
        last.update(event)
        sys.stdout.write(event.get("response", ""))
        sys.stdout.flush()

    client.stream("POST", "/api/generate", request, show)
    sys.stdout.write("\n\n")  # generate(): two Println after a prompt
    if flags.get("verbose"):
        for label, key in (("total duration", "total_duration"), ("load duration", "load_duration"), ("eval duration", "eval_duration")):
            print(f"{label + ':':<22}{go_duration(int(last.get(key, 0)))}", file=sys.stderr)
        print(f"{'prompt eval count:':<22}{last.get('prompt_eval_count', 0)} token(s)", file=sys.stderr)
        print(f"{'eval count:':<22}{last.get('eval_count', 0)} token(s)", file=sys.stderr)
    return 0


def cmd_version() -> int:
    """versionHandler: the server's version when one answers, else a warning."""
    server_version = ""
    try:
        server_version = str((Client().do("GET", "/api/version") or {}).get("version", ""))
    except OllamaError:
        print("Warning: could not connect to a running Ollama instance")
    if server_version:
        print(f"ollama version is {server_version}")
    if server_version != VERSION:
        print(f"Warning: client version is {VERSION}")
    print(f"({DOUBLE_NOTE})")
    return 0


USAGE = f"""Large language model runner ({DOUBLE_NOTE})

Usage:
  ollama [flags]
  ollama [command]

Available Commands:
  serve       Start ollama
  create      Create a model from a Modelfile
  show        Show information for a model
  run         Run a model
  list        List models
  rm          Remove a model

Flags:
  -h, --help      help for ollama
  -v, --version   Show version information
"""

UNIMPLEMENTED = ("stop", "pull", "push", "ps", "cp")


def main(argv: list[str]) -> int:
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            sys.stdout.write(USAGE)
            return 0
        if argv[0] in ("-v", "--version"):
            return cmd_version()
        command, rest = argv[0], argv[1:]
        if command in ("serve", "start"):
            return serve()
        handlers = {"create": cmd_create, "list": cmd_list, "ls": cmd_list, "show": cmd_show, "rm": cmd_rm, "run": cmd_run}
        if command in handlers:
            if "-h" in rest or "--help" in rest:
                sys.stdout.write(USAGE)
                return 0
            return handlers[command](rest)
        if command in UNIMPLEMENTED:
            return _cli_error(f'the ollama double does not implement "{command}"')
        return _cli_error(f'unknown command "{command}" for "ollama"')
    except OllamaError as exc:
        return _cli_error(exc.message)
    except OSError as exc:
        return _cli_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
