"""Category qualifications from an instrument's qualifications page: platform administrators only."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from labcommons.app import create_app
from labcommons.booking.models import Qualification
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.factories import World
from tests.web.conftest import csrf_of, sign_in


def _qualifications(world: World) -> list[Qualification]:
    with world.db.unit_of_work(write=False) as s:
        return list(s.scalars(select(Qualification).order_by(Qualification.id)).all())


def test_platform_admin_grants_and_revokes_a_category_qualification(world: World) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "carol@example.org"), "platform_admin")
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "facility_manager",
                         facility_id=world.facilities["CQ-LAB"])
    seq = world.instruments["SEQ"]
    url = f"/manage/instruments/{seq}/qualifications"
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "bob")
        page = client.get(url)
        assert page.status_code == 200
        assert 'name="category"' not in page.text and 'id="category-qualifications"' not in page.text
        refused = client.post(url, data={"csrf_token": csrf_of(page.text), "email": "alice@example.org",
                                         "level": "independent", "category": "GEN"})
        assert refused.status_code == 403
    assert _qualifications(world) == []
    with TestClient(create_app(db=world.db)) as client:
        sign_in(client, "carol")
        page = client.get(url)
        assert page.status_code == 200
        assert '<option value="GEN.SEQ"' in page.text and '<option value="GEN"' in page.text
        assert '<option value="MIC"' not in page.text
        token = csrf_of(page.text)
        other = client.post(url, data={"csrf_token": token, "email": "alice@example.org", "category": "MIC"})
        assert other.status_code == 422
        granted = client.post(url, data={"csrf_token": token, "email": "alice@example.org", "level": "independent",
                                         "category": "GEN"}, follow_redirects=False)
        assert granted.status_code == 303, granted.text
        [q] = _qualifications(world)
        assert (q.category_code, q.instrument_id) == ("GEN", None)
        page = client.get(url)
        assert f'data-category-qualification="{q.id}"' in page.text
        revoked = client.post(f"/manage/qualifications/{q.id}/revoke",
                              data={"csrf_token": csrf_of(page.text), "instrument_id": str(seq)},
                              follow_redirects=False)
        assert revoked.status_code == 303 and revoked.headers["location"] == url
        assert _qualifications(world)[0].revoked_at is not None
        assert f'data-category-qualification="{q.id}"' not in client.get(url).text
