"""Feedback core: validated, idempotent by ``feedback_id``, tied to a generation of the same user.

Idempotency is honest: replaying a ``feedback_id`` with the same content answers ``duplicate``; with other
content it is ALREADY_EXISTS, and ``duplicate`` is only ever answered for a row that is really stored.
"""

from __future__ import annotations

from datetime import UTC

from pigment.services.common.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    PermissionDenied,
    number,
)
from pigment.services.common.ids import check_id, check_key
from pigment.services.common.limits import check_finite
from pigment.services.store.db import transaction
from pigment.services.store.tables import Feedback, Generation, RenderRequest, User
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

KINDS = ("like", "dislike", "rating", "pick", "click")
MAX_OTHERS = 64
MAX_VALUE = 1e6


class FeedbackCore:
    def __init__(self, sessions):
        self.sessions = sessions

    def log(self, *, feedback_id: str, user_id: str, generation_id: str, kind: str, value: float = 0.0,
            other_generation_ids: list[str] | None = None, principal=None) -> bool:
        """Store one signal; returns True if this ``feedback_id`` was already recorded with the same content
        (nothing changes). The same id with other content: AlreadyExists.

        ``principal`` (None: a trusted internal caller): the user and generations must be of its tenant;
        another tenant's are NOT_FOUND, as if they did not exist."""
        others = list(other_generation_ids or [])
        self._validate(feedback_id, user_id, generation_id, kind, value, others)
        content = (user_id, generation_id, kind, float(value), others)
        try:
            with transaction(self.sessions) as s:
                if principal is not None:
                    user = s.get(User, user_id)
                    if user is None or not principal.sees(user.tenant):
                        raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
                if (row := s.get(Feedback, feedback_id)) is not None:
                    return self._same(row, content)
                gens = {g.generation_id: g for g in s.scalars(
                    select(Generation).where(Generation.generation_id.in_([generation_id, *others])))}
                if principal is not None:
                    owners = dict(s.execute(select(User.user_id, User.tenant).where(
                        User.user_id.in_({g.user_id for g in gens.values()}))).all())
                    gens = {k: g for k, g in gens.items() if g.user_id in owners and principal.sees(owners[g.user_id])}
                for gid in [generation_id, *others]:
                    if gid not in gens:
                        raise NotFound(f"generation {gid} not found", reason="GENERATION_NOT_FOUND")
                    if gens[gid].user_id != user_id:
                        raise PermissionDenied(f"generation {gid} belongs to another user",
                                               reason="NOT_THE_USERS_GENERATION")
                s.add(Feedback(feedback_id=feedback_id, generation_id=generation_id, user_id=user_id, kind=kind,
                               value=float(value), other_generation_ids=others))
            return False
        except IntegrityError:  # a concurrent call with the same id won the race: compare with what it stored
            with transaction(self.sessions) as s:
                row = s.get(Feedback, feedback_id)
            if row is None:
                raise
            return self._same(row, content)

    @staticmethod
    def _same(row: Feedback, content: tuple) -> bool:
        stored = (row.user_id, row.generation_id, row.kind, float(row.value), list(row.other_generation_ids or []))
        if stored != content:
            raise AlreadyExists(f"feedback_id {row.feedback_id} was already used with different content",
                                reason="IDEMPOTENCY_KEY_REUSED", field="feedback_id")
        return True

    @staticmethod
    def _validate(feedback_id: str, user_id: str, generation_id: str, kind: str, value: float,
                  others: list[str]) -> None:
        check_key("feedback_id", feedback_id)
        check_id("user_id", user_id)
        check_key("generation_id", generation_id)
        if kind not in KINDS:
            allowed = "allowed " + ", ".join(f"FEEDBACK_KIND_{k.upper()}" for k in KINDS)
            raise InvalidInput(f"kind is unset or unknown: {allowed}", reason="UNKNOWN_ENUM_VALUE", field="kind",
                               allowed=allowed)
        check_finite("value", value, MAX_VALUE)
        if kind == "rating" and not (1 <= value <= 5):
            raise InvalidInput(f"value={number(value)} is out of range for a rating: allowed 1..5",
                               reason="OUT_OF_RANGE", field="value", allowed="allowed 1..5")
        if kind == "pick" and not others:
            raise InvalidInput("a pick needs other_generation_ids (the images not chosen)", reason="MISSING_FIELD",
                               field="other_generation_ids", allowed="at least one generation id")
        if len(others) > MAX_OTHERS:
            raise InvalidInput(f"{len(others)} other_generation_ids: allowed at most {MAX_OTHERS}", reason="TOO_MANY",
                               field="other_generation_ids", allowed=f"allowed at most {MAX_OTHERS}")
        for n, gid in enumerate(others):
            check_key(f"other_generation_ids[{n}]", gid)


def read_feedback(sessions, user_id: str, limit: int) -> list:
    """The user's newest ``limit`` feedback rows (oldest first) as FeedbackRow, each with the keyword lists
    of the generated images it is about (from the render request that made them).

    The limit is the flood cap: a round reads at most ``limit`` rows, so a burst of feedback ages out as
    newer feedback arrives, and ``feedback_evidence`` counts one opinion per image and clips each
    keyword's evidence. Retrieved catalog items carry no keywords and add no evidence."""
    from pigment.models.personalize import FeedbackRow

    with transaction(sessions) as s:
        rows = list(s.scalars(select(Feedback).where(Feedback.user_id == user_id)
                              .order_by(Feedback.created_at.desc(), Feedback.feedback_id).limit(limit)))
        gids = {r.generation_id for r in rows} | {o for r in rows for o in (r.other_generation_ids or [])}
        made = dict(s.execute(select(Generation.generation_id, RenderRequest.conditioning)
                              .join(RenderRequest, Generation.request_id == RenderRequest.request_id)
                              .where(Generation.generation_id.in_(gids), Generation.retrieved_item_id.is_(None))
                              ).all()) if gids else {}
    keywords = {g: list((cond or {}).get("keywords") or []) for g, cond in made.items()}
    return [FeedbackRow(r.feedback_id, r.generation_id, r.kind, float(r.value),
                        int(r.created_at.replace(tzinfo=r.created_at.tzinfo or UTC).timestamp() * 1000), keywords.get(r.generation_id, []),
                        [keywords.get(o, []) for o in (r.other_generation_ids or [])])
            for r in reversed(rows)]
