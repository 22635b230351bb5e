"""Feedback core: validated, idempotent by ``feedback_id``, tied to a generation of the same user."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from pigment.services.common.errors import InvalidInput, NotFound, PermissionDenied
from pigment.services.gateway.core import REQUEST_ID_RE
from pigment.services.store.db import transaction
from pigment.services.store.tables import Feedback, Generation, User

KINDS = ("like", "dislike", "rating", "pick", "click")


class FeedbackCore:
    def __init__(self, sessions):
        self.sessions = sessions

    def log(self, *, feedback_id: str, user_id: str, generation_id: str, kind: str, value: float = 0.0,
            other_generation_ids: list[str] | None = None, principal=None) -> bool:
        """Store one signal; returns True if this ``feedback_id`` was already recorded (nothing changes).

        ``principal`` (None: a trusted internal caller): the user and generations must be of its tenant;
        another tenant's are NOT_FOUND, as if they did not exist."""
        others = list(other_generation_ids or [])
        self._validate(feedback_id, kind, value, others)
        try:
            with transaction(self.sessions) as s:
                if principal is not None:
                    user = s.get(User, user_id)
                    if user is None or not principal.sees(user.tenant):
                        raise NotFound(f"user {user_id!r} not found")
                if s.get(Feedback, feedback_id) is not None:
                    return True
                gens = {g.generation_id: g for g in s.scalars(
                    select(Generation).where(Generation.generation_id.in_([generation_id, *others])))}
                if principal is not None:
                    owners = dict(s.execute(select(User.user_id, User.tenant).where(
                        User.user_id.in_({g.user_id for g in gens.values()}))).all())
                    gens = {k: g for k, g in gens.items() if g.user_id in owners and principal.sees(owners[g.user_id])}
                for gid in [generation_id, *others]:
                    if gid not in gens:
                        raise NotFound(f"generation {gid!r} not found")
                    if gens[gid].user_id != user_id:
                        raise PermissionDenied(f"generation {gid!r} belongs to another user")
                s.add(Feedback(feedback_id=feedback_id, generation_id=generation_id, user_id=user_id, kind=kind,
                               value=float(value), other_generation_ids=others))
            return False
        except IntegrityError:  # a concurrent replay of the same id won the race
            return True

    @staticmethod
    def _validate(feedback_id: str, kind: str, value: float, others: list[str]) -> None:
        if not REQUEST_ID_RE.match(feedback_id or ""):
            raise InvalidInput(f"feedback_id={feedback_id!r} is malformed: allowed 1-64 characters of [A-Za-z0-9_-]")
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}")
        if kind == "rating" and not (1 <= value <= 5):
            raise InvalidInput(f"value={value} is out of range for a rating: allowed 1..5")
        if kind == "pick" and not others:
            raise InvalidInput("a pick needs other_generation_ids (the images not chosen)")
