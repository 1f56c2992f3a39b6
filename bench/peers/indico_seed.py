"""Seed Indico for the peer benchmark; runs with Indico's own Python, never LabCommons' (INDICO_CONFIG must be set).

`python indico_seed.py ROOMS USERS` makes sure an admin (user 1), USERS ordinary users with a full-scope personal
token each, one location and ROOMS public rooms bookable without confirmation exist, deletes every booking left
by earlier runs, and prints one line `SEED {"rooms": [...], "tokens": [[user_id, token], ...], ...}`.
Idempotent: existing users and rooms are reused, and tokens are regenerated (Indico stores only their hash).
"""

from __future__ import annotations

import json
import sys

from indico.core.db import db
from indico.core.db.sqlalchemy.protection import ProtectionMode
from indico.core.oauth.models.personal_tokens import PersonalToken
from indico.modules.rb import rb_settings
from indico.modules.rb.models.locations import Location
from indico.modules.rb.models.rooms import Room
from indico.modules.users import User
from indico.web.flask.app import make_app

LOCATION = "LabCommons bench"
TOKEN_NAME = "bench"
SCOPES = ["full:everything"]


def _user(index: int, *, admin: bool) -> User:
    email = f"bench{index}@peer.invalid"
    user = User.query.filter(User.all_emails == email).first()
    if user is None:
        user = User(first_name=f"Bench{index}", last_name="User", email=email, is_admin=admin)
        db.session.add(user)
        db.session.flush()
    return user


def _token(user: User) -> str:
    """A fresh access token for the user's bench token, the same model `indico user token create` makes."""
    token = user.query_personal_tokens().filter(PersonalToken.name == TOKEN_NAME).first()
    if token is None:
        token = PersonalToken(user=user, name=TOKEN_NAME, scopes=SCOPES)
    return str(token.generate_token())


def seed(rooms: int, users: int) -> dict[str, object]:
    """Users, tokens, rooms and settings; every reservation of earlier runs removed."""
    admin = _user(1, admin=True)
    ordinary = [_user(i, admin=False) for i in range(2, users + 2)]
    location = Location.query.filter_by(name=LOCATION, is_deleted=False).first()
    if location is None:
        location = Location(name=LOCATION, map_url_template="")
        db.session.add(location)
        db.session.flush()
    existing = Room.query.filter_by(location=location, is_deleted=False).order_by(Room.id).all()
    for number in range(len(existing), rooms):
        # Public, reservable, no confirmation, no advance or length limit, no bookable-hours or nonbookable
        # periods: nothing in the room's rules refuses the benchmark's bookings.
        room = Room(location=location, building="1", floor="0", number=str(number + 1),
                    verbose_name=f"Bench room {number + 1}", owner=admin, protection_mode=ProtectionMode.public,
                    is_reservable=True, reservations_need_confirmation=False, max_advance_days=None,
                    booking_limit_days=None, capacity=10)
        db.session.add(room)
        existing.append(room)
    db.session.flush()
    # The benchmark books up to a year ahead; the global limit is on a booking's length, raised anyway.
    rb_settings.set("booking_limit", 3650)
    rb_settings.set("grace_period", None)
    db.session.execute(db.text("TRUNCATE roombooking.reservations CASCADE"))
    tokens = [[user.id, _token(user)] for user in ordinary]
    admin_token = _token(admin)
    db.session.commit()
    return {"rooms": [room.id for room in existing[:rooms]], "tokens": tokens,
            "admin": [admin.id, admin_token]}


def main(argv: list[str]) -> int:
    rooms, users = int(argv[0]), int(argv[1])
    app = make_app()
    with app.app_context():
        result = seed(rooms, users)
    print("SEED " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
