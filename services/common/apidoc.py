"""docs/API.md from the .proto files: every service, message, field (with its default, from the comments) and
enum, plus the flags and error reasons a client sees. ``python -m pigment.services.common.apidoc`` rewrites
the file; tests/test_api_contract.py checks it is up to date (as protocheck does for the stubs)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "docs" / "API.md"

# Response flags (GenerateResponse.flags, EncodePreferencesResponse.flags): stable codes, never renamed.
FLAGS = {
    "NON_PERSONALIZED_EMPTY_HISTORY": "The user has no usable history: the images follow the prompt alone.",
    "EMPTY_HISTORY": "The preference model got no captions (set with NON_PERSONALIZED_EMPTY_HISTORY).",
    "HISTORY_TRUNCATED": "The history was longer than the LLM's context: the oldest entries were left out.",
    "KEYWORDS_REJECTED": "The LLM proposed keywords that are malformed or outside the preset's vocabulary; "
                         "they were dropped. Keywords dropped because the prompt already names their attribute "
                         "(\"star\" for \"a star\") or because they repeat are expected and not flagged.",
    "NO_KEYWORDS": "No keyword survived validation: the render used the prompt (and soft tokens) only.",
    "EXPLORED": "This result's keywords were varied on purpose: the request's candidate > 0 changes the attribute "
                "the user's signals leave least certain (explored_attribute names it), or exploration is on "
                "(setting explore_rate). A pick between such images answers that attribute. After a change of "
                "the user's whole taste the candidates may vary several attributes at once (\"colour+background\"), "
                "chosen so that the picks and ratings of the round tell them apart.",
    "FEEDBACK_APPLIED": "The user's feedback on earlier images was read as evidence (feedback_used lists the ids).",
    "KEYWORDS_CHANGED_BY_FEEDBACK": "That feedback changed the keywords the history alone would give.",
    "FEEDBACK_CONTRADICTION_LATEST_WINS": "The user gave opposite feedback on one image (like, then dislike): the "
                                          "latest counts.",
    "HISTORY_UNREADABLE": "Too little of the history is readable by the preference model (most caption tokens "
                          "unknown): no taste is invented; the result is non-personalized.",
    "HISTORY_ALL_NEGATIVE": "The history holds only negative signals (dislikes, low ratings): nothing to follow; "
                            "the result is non-personalized.",
    "REPLAYED": "This request_id was seen before: the stored result is returned, nothing is rendered again. A "
                "replay after DEADLINE_EXCEEDED returns the render that kept running on the server.",
}

# ErrorInfo.reason (domain pigment.dev) -> (gRPC status, what it means). Stable codes, never renamed.
REASONS = {
    "OUT_OF_RANGE": ("INVALID_ARGUMENT", "A number outside its allowed range (BadRequest says which field, range)."),
    "MALFORMED_ID": ("INVALID_ARGUMENT", "An id or idempotency key with characters or a length not allowed."),
    "MALFORMED_TEXT": ("INVALID_ARGUMENT", "Text with a NUL character."),
    "TOO_LONG": ("INVALID_ARGUMENT", "Text over its character limit."),
    "TOO_MANY": ("INVALID_ARGUMENT", "A list over its size limit."),
    "MISSING_FIELD": ("INVALID_ARGUMENT", "A required field is empty."),
    "ONE_OF_REQUIRED": ("INVALID_ARGUMENT", "Exactly one of two fields must be set."),
    "UNKNOWN_ENUM_VALUE": ("INVALID_ARGUMENT", "An enum value this server does not know (or UNSPECIFIED where "
                                               "a value is required)."),
    "NOT_A_MULTIPLE": ("INVALID_ARGUMENT", "An image size that is not a multiple the render backend accepts."),
    "DUPLICATE_ID": ("INVALID_ARGUMENT", "The same id twice in one call."),
    "INVALID_PAGE_TOKEN": ("INVALID_ARGUMENT", "A page token this server did not issue."),
    "EMPTY_SEGMENT": ("INVALID_ARGUMENT", "A batch segment without users."),
    "NO_ITEM_INDEX": ("INVALID_ARGUMENT", "Retrieval asked of a deployment without an item index."),
    "INVALID_ARGUMENT": ("INVALID_ARGUMENT", "Another invalid input; the message says what is allowed."),
    "USER_NOT_FOUND": ("NOT_FOUND", "The user does not exist (or belongs to a tenant the caller cannot see)."),
    "ITEM_NOT_FOUND": ("NOT_FOUND", "Interactions name unknown items; BadRequest lists every such row."),
    "GENERATION_NOT_FOUND": ("NOT_FOUND", "An unknown generation (or another tenant's) in feedback or GetGeneration."),
    "IMAGE_NOT_FOUND": ("NOT_FOUND", "The item or generation exists but has no stored image."),
    "JOB_NOT_FOUND": ("NOT_FOUND", "GetJob or CancelJob names an unknown job (or another tenant's)."),
    "NOT_FOUND": ("NOT_FOUND", "Another missing resource (a model version)."),
    "IDEMPOTENCY_KEY_REUSED": ("ALREADY_EXISTS", "request_id, feedback_id, job_id or batch_id reused with "
                                                 "different content (metadata field names which)."),
    "ALREADY_EXISTS": ("ALREADY_EXISTS", "Another conflict."),
    "PERMISSION_DENIED": ("PERMISSION_DENIED", "The key lacks the scope or tenant for this call."),
    "NOT_THE_USERS_GENERATION": ("PERMISSION_DENIED", "Feedback on another user's generation."),
    "USER_ID_TAKEN": ("PERMISSION_DENIED", "create_user with an id another tenant holds."),
    "UNAUTHENTICATED": ("UNAUTHENTICATED", "Missing or invalid API key."),
    "RATE_LIMITED": ("RESOURCE_EXHAUSTED", "The tenant's rate limit or image quota is spent (RetryInfo, "
                                           "QuotaFailure)."),
    "OVER_QUOTA_SIZE": ("RESOURCE_EXHAUSTED", "One call asks more than the tenant's whole limit: split it."),
    "QUEUE_FULL": ("RESOURCE_EXHAUSTED", "The render queue is at max_queue_depth (RetryInfo)."),
    "SERVER_BUSY": ("RESOURCE_EXHAUSTED", ("max_concurrent_rpcs calls are in flight (RetryInfo); on the HTTP "
                                           "face, 4 x that requests, answered 503 with Retry-After.")),
    "OVERLOADED": ("RESOURCE_EXHAUSTED", "Another overload (RetryInfo)."),
    "FAILED_PRECONDITION": ("FAILED_PRECONDITION", "The deployment cannot serve this (e.g. no catalog items to "
                                                   "retrieve, an adapter whose sha256 does not match)."),
    "EDIT_NOT_UNDERSTOOD": ("FAILED_PRECONDITION", "EditImage: the instruction names no single attribute the "
                                                   "preset can edit (the message says why)."),
    "NO_REFERENCE_SUPPORT": ("FAILED_PRECONDITION", "references sent to a preset without a reference_projector."),
    "QUEUE_UNAVAILABLE": ("UNAVAILABLE", "The render queue's broker is unreachable: retry with the same "
                                         "request_id (RetryInfo)."),
    "MODEL_NOT_READY": ("UNAVAILABLE", "A model could not be loaded (RetryInfo)."),
    "UNAVAILABLE": ("UNAVAILABLE", "A backend (database, broker, rate-limit store) is down (RetryInfo)."),
    "RENDER_FAILED": ("the render's", "The worker failed this render; the status is the worker's error's."),
    "DEADLINE_EXCEEDED": ("DEADLINE_EXCEEDED", "The render did not finish in time; it continues: replay the "
                                               "same request_id."),
    "INTERNAL": ("INTERNAL", "A bug; logged on the server with the method name."),
}

HEADER = """# pigment API v1 reference

Generated from `protos/pigment/v1/*.proto` by `python -m pigment.services.common.apidoc` (`make api-docs`);
a test fails when this file and the protos disagree. Package `pigment.v1`; the contract is checked with
`buf lint` (STANDARD) and `buf breaking` against `protos/contract/pigment-v1.binpb` (`make buf`).

**Defaults.** Fields marked `optional` mean "unset = the default named in their description"; a set value,
0 included, is used as given and range-checked. Other scalars default to protobuf's zero value.

**Errors.** Every error is a `google.rpc.Status` (read it with `grpc_status.rpc_status.from_call`, or the
`grpc-status-details-bin` trailer in other languages) with these details:

- `google.rpc.ErrorInfo`: always; `domain` is `pigment.dev`, `reason` one of the codes below, `metadata`
  has `field` and `allowed` when the error is about one field;
- `google.rpc.BadRequest`: one field violation per bad field, with its path (`interactions[3].item_id`)
  and what is allowed;
- `google.rpc.RetryInfo`: on RESOURCE_EXHAUSTED and UNAVAILABLE, how long to wait before retrying;
- `google.rpc.QuotaFailure`: when a tenant's rate limit or quota is spent (`subject` is `tenant:NAME`).

Retrying with the same idempotency key (request_id, feedback_id, job_id, batch_id) is always safe.

## Behaviour

- **Replays.** `GeneratePersonalized` is idempotent by `request_id`. When a call ends in DEADLINE_EXCEEDED
  the render keeps running on the server; calling again with the same request (same parameters) waits for
  it and returns its images with the flag `REPLAYED`, and the preference flags of the first call.
- **Retrieval unset.** `RETRIEVAL_MODE_UNSPECIFIED` takes the server's `retrieval_mode` setting
  (`generate_only` unless configured); `Decision.reason` then says that the server's setting chose, not
  the request.
- **`RETRIEVAL_MODE_BOTH`** returns up to `num_images` catalog items *and* `num_images` rendered images:
  up to 2 x `num_images` results, retrieved first. `RETRIEVE_ONLY` returns up to `num_images` items.
- **History pages.** `GetHistory` returns the newest page first; entries within a page are oldest first,
  and `next_page_token` leads to older entries. The token is a cursor, so interactions logged while paging
  do not shift pages. `total_size` counts all the user's interactions.
- **Interaction batches** are all or nothing: one invalid or unknown row refuses the whole batch, and the
  error's BadRequest names every such row. `batch_id` makes a reload safe: the same id and content logs
  nothing new (`duplicate = true`); the same id with other content is ALREADY_EXISTS.
- **Timestamps.** An unset `Interaction.timestamp_ms` means "when the server logs it"; 0 is 1970-01-01.
"""


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    """The protos' descriptors with their comments (protoc's source info)."""
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("pigment/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", "--include_source_info",
                        f"--descriptor_set_out={out}", *sources], check=True)
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple, str]:
    out = {}
    for loc in fd.source_code_info.location:
        # buf:lint:ignore markers are for the linter, not for readers
        text = " ".join(line.strip() for line in loc.leading_comments.splitlines()
                        if line.strip() and not line.strip().startswith("buf:lint:ignore"))
        trailing = loc.trailing_comments.strip()
        joined = " ".join(t for t in (text, trailing) if t)
        if joined:
            out[tuple(loc.path)] = joined
    return out


def _type(field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, str]) -> str:
    if field.type_name:
        name = field.type_name.rsplit(".", 1)[-1]
        if name in maps:
            return maps[name]
        return f"[{name}](#{name.lower()})"
    return descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)[5:].lower()


def _label(field: descriptor_pb2.FieldDescriptorProto, msg: descriptor_pb2.DescriptorProto) -> str:
    if field.proto3_optional:
        return "optional"
    if field.label == field.LABEL_REPEATED:
        is_map = any(m.options.map_entry and field.type_name.endswith(f".{m.name}") for m in msg.nested_type)
        return "" if is_map else "repeated"
    if field.HasField("oneof_index"):
        return f"oneof {msg.oneof_decl[field.oneof_index].name}"
    return ""


def _message(msg: descriptor_pb2.DescriptorProto, path: tuple, docs: dict) -> list[str]:
    maps = {m.name: f"map<{_type(m.field[0], {})}, {_type(m.field[1], {})}>" for m in msg.nested_type
            if m.options.map_entry}
    lines = [f"### {msg.name}", ""]
    if docs.get(path):
        lines += [docs[path], ""]
    if not msg.field:
        return lines + ["(no fields)", ""]
    lines += ["| # | field | type | label | description |", "|---|---|---|---|---|"]
    for n, field in enumerate(msg.field):
        text = docs.get((*path, 2, n), "").replace("|", "\\|")
        lines.append(f"| {field.number} | `{field.name}` | {_type(field, maps)} | {_label(field, msg)} | {text} |")
    return lines + [""]


def _enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple, docs: dict) -> list[str]:
    lines = [f"### {enum.name}", ""]
    if docs.get(path):
        lines += [docs[path], ""]
    lines += ["| value | number | meaning |", "|---|---|---|"]
    for n, value in enumerate(enum.value):
        lines.append(f"| `{value.name}` | {value.number} | {docs.get((*path, 2, n), '')} |")
    return lines + [""]


def _file(fd: descriptor_pb2.FileDescriptorProto) -> list[str]:
    docs = _comments(fd)
    lines = [f"## {fd.name}", ""]
    for s, service in enumerate(fd.service):
        lines += [f"### service {service.name}", "", docs.get((6, s), ""), "",
                  "| rpc | request | response | description |", "|---|---|---|---|"]
        for m, method in enumerate(service.method):
            stream = "stream " if method.server_streaming else ""
            req, resp = (t.rsplit(".", 1)[-1] for t in (method.input_type, method.output_type))
            lines.append(f"| `{method.name}` | [{req}](#{req.lower()}) | {stream}[{resp}](#{resp.lower()}) | "
                         f"{docs.get((6, s, 2, m), '')} |")
        lines.append("")
    for e, enum in enumerate(fd.enum_type):
        lines += _enum(enum, (5, e), docs)
    for m, msg in enumerate(fd.message_type):
        lines += _message(msg, (4, m), docs)
    return lines


def render() -> str:
    lines = [HEADER, "## Flags", "", "`GenerateResponse.flags` holds zero or more of these codes.", "",
             "| flag | meaning |", "|---|---|"]
    lines += [f"| `{flag}` | {text} |" for flag, text in FLAGS.items()]
    lines += ["", "## Error reasons", "", "| reason | status | meaning |", "|---|---|---|"]
    lines += [f"| `{reason}` | {status} | {text} |" for reason, (status, text) in REASONS.items()]
    lines.append("")
    for fd in descriptors().file:
        lines += _file(fd)
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
