"""Demo regional identity services: small real OpenID Connect providers for `labcommons demo` and the tests.

Each one signs RS256 ID tokens with a key made at start, keeps codes and tokens in memory, and lets a visitor
pick a demo person with one click instead of typing a password. Never expose one beyond loopback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import uvicorn
from jinja2 import Environment
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from labcommons.identity.models import IdentityProvider

CODE_LIFETIME_SECONDS = 120
TOKEN_LIFETIME_SECONDS = 3600
DEFAULT_APP_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class DemoPerson:
    """Someone the demo service can vouch for; `institution` is an institution code or None."""

    sub: str
    name: str
    email: str
    institution: str | None
    affiliation_zh: str
    affiliation_en: str
    # Shown on the picker so a newcomer knows which person demonstrates linking to an existing account.
    has_local_account: bool = False


@dataclass(frozen=True)
class DemoRegion:
    """One region's demo identity service: its relying-party registration and its people."""

    code: str
    name: str
    display_name_zh: str
    display_name_en: str
    client_id: str
    client_secret: str
    default_port: int
    persons: tuple[DemoPerson, ...]


DEMO_REGIONS: dict[str, DemoRegion] = {
    "SC": DemoRegion(
        code="SC", name="sc-demo-ids", display_name_zh="四川省统一身份认证（演示）",
        display_name_en="Sichuan identity service (demo)", client_id="labcommons",
        client_secret="sc-demo-secret-not-for-production", default_port=8101,
        persons=(
            DemoPerson("sc-0001", "Emily Carter", "emily.carter@shudu-univ.example.org", "SC-SHU",
                       "蜀都大学 副教授", "Associate professor, Shudu University", has_local_account=True),
            DemoPerson("sc-0002", "孙明远", "sun.mingyuan@xlut.example.cn", "SC-TECH",
                       "西岭理工大学 博士后", "Postdoctoral researcher, Xiling University of Technology"),
            DemoPerson("sc-0003", "唐可欣", "tang.kexin@jinguan-photonics.example.com", None,
                       "锦官光电科技（非成员单位）工程师", "Engineer, Jinguan Photonics (not a member institution)"),
        ),
    ),
    "CQ": DemoRegion(
        code="CQ", name="cq-demo-ids", display_name_zh="重庆市统一身份认证（演示）",
        display_name_en="Chongqing identity service (demo)", client_id="labcommons",
        client_secret="cq-demo-secret-not-for-production", default_port=8102,
        persons=(
            DemoPerson("cq-0001", "李巍", "li.wei@yzmu.example.cn", "CQ-MEDU",
                       "渝州医科大学 研究员", "Researcher, Yuzhou Medical University", has_local_account=True),
            DemoPerson("cq-0002", "何晓雨", "he.xiaoyu@liangjiang-dx.example.cn", "CQ-LJDX",
                       "两江精准检测科技有限公司 工程师", "Engineer, Liangjiang Precision Diagnostics Co., Ltd."),
            DemoPerson("cq-0003", "邓嘉言", "deng.jiayan@chaotianmen-bio.example.com", None,
                       "朝天门生物科技（初创企业）创始人", "Founder, Chaotianmen Biotech (a start-up)"),
        ),
    ),
}


def redirect_uri_for(app_base_url: str, provider_name: str) -> str:
    """The relying party's callback for a provider, as the platform builds it from its public base URL."""
    return f"{app_base_url.rstrip('/')}/login/oidc/{provider_name}/callback"


@dataclass
class _Grant:
    person: DemoPerson
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str
    expires_at: float
    auth_time: int


@dataclass
class _State:
    key: RSAKey
    codes: dict[str, _Grant] = field(default_factory=dict)
    access_tokens: dict[str, tuple[DemoPerson, float]] = field(default_factory=dict)


_PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ region.display_name_zh }} / {{ region.display_name_en }}</title>
<style>
body { font-family: system-ui, "Noto Sans CJK SC", sans-serif; background: #eef2f6; margin: 0; color: #1d2733; }
main { max-width: 34rem; margin: 3rem auto; background: #fff; padding: 2rem; border-radius: 8px;
       box-shadow: 0 2px 10px rgba(0,0,0,.08); }
h1 { font-size: 1.35rem; margin: 0 0 .2rem; } .en { color: #5b6876; font-size: .92em; }
.banner { background: #fff5d6; border: 1px solid #e8c95a; padding: .6rem .8rem; border-radius: 6px; font-size: .9rem; }
.person { display: block; width: 100%; text-align: left; margin: .6rem 0; padding: .8rem 1rem; font: inherit;
          border: 1px solid #c5d0db; border-radius: 6px; background: #f8fafc; cursor: pointer; }
.person:hover, .person:focus { border-color: #2563eb; background: #eef4ff; }
.person strong { font-size: 1.05rem; } .person small { display: block; color: #5b6876; }
.tag { font-size: .75rem; background: #dcfce7; color: #166534; padding: .05rem .4rem; border-radius: 4px; }
.cancel { background: none; border: none; color: #5b6876; text-decoration: underline; cursor: pointer; font: inherit; }
.error { color: #b91c1c; }
</style></head><body><main>
<h1>{{ region.display_name_zh }}</h1><p class="en">{{ region.display_name_en }}</p>
{% if error %}
<p class="error" role="alert">{{ error }}</p>
{% else %}
<p class="banner">演示服务：无需密码，点选一位演示人员即可登录；切勿用于生产环境。<br>
<span class="en">Demo service: no password is asked. Pick a demo person to sign in; never use this in production.
</span></p>
<p>{{ client_host }} 请求确认您的身份。<br><span class="en">{{ client_host }} asks who you are.</span></p>
<form method="post" action="/authorize">
  {% for key, value in params.items() %}<input type="hidden" name="{{ key }}" value="{{ value }}">{% endfor %}
  {% for person in region.persons %}
  <button type="submit" name="sub" value="{{ person.sub }}" class="person" data-sub="{{ person.sub }}">
    <strong>{{ person.name }}</strong>
    {% if person.has_local_account %}<span class="tag">已有平台账号 · has a platform account</span>{% endif %}
    <small>{{ person.affiliation_zh }} · {{ person.affiliation_en }}</small>
    <small>{{ person.email }}</small>
  </button>
  {% endfor %}
  <button type="submit" name="cancel" value="1" class="cancel">取消 / Cancel</button>
</form>
{% endif %}
</main></body></html>
""")

_AUTHORIZE_PARAMS = ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce", "code_challenge",
                     "code_challenge_method")


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def _claims(person: DemoPerson, region: DemoRegion) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": person.sub, "email": person.email, "email_verified": True, "name": person.name,
                              "region": region.code}
    if person.institution:
        claims["institution"] = person.institution
    return claims


def create_provider_app(region: DemoRegion, issuer: str, redirect_uris: list[str]) -> Starlette:
    """The ASGI app of one demo provider at `issuer`, accepting only `redirect_uris` for its one client."""
    issuer = issuer.rstrip("/")
    state = _State(key=RSAKey.generate_key(2048, parameters={
        "kid": f"{region.name}-{secrets.token_hex(4)}", "use": "sig", "alg": "RS256"}))
    persons = {p.sub: p for p in region.persons}

    def error_page(message: str, status: int = 400) -> HTMLResponse:
        return HTMLResponse(_PAGE.render(region=region, error=message), status_code=status)

    def redirect_back(redirect_uri: str, params: dict[str, str]) -> RedirectResponse:
        # RFC 9207: the iss parameter tells the client which provider answered, against mix-up attacks.
        separator = "&" if urlsplit(redirect_uri).query else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{urlencode(params | {'iss': issuer})}", status_code=303)

    def oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if error == "invalid_client":
            headers["WWW-Authenticate"] = 'Basic realm="demo"'
        return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=headers)

    async def discovery(request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "userinfo_endpoint": f"{issuer}/userinfo",
            "jwks_uri": f"{issuer}/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "email", "email_verified",
                                 "name", "institution", "region"],
            "authorization_response_iss_parameter_supported": True,
        })

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse({"keys": [state.key.as_dict(private=False)]})

    async def authorize(request: Request) -> Response:
        source = await request.form() if request.method == "POST" else request.query_params
        params = {k: str(source[k]) for k in _AUTHORIZE_PARAMS if source.get(k)}
        # Until client and redirect URI are known good, errors stay here instead of redirecting (open redirect).
        if params.get("client_id") != region.client_id:
            return error_page("未知的应用 / Unknown client_id.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in redirect_uris:
            return error_page("回调地址未登记 / This redirect_uri is not registered: " + redirect_uri)
        back = {"state": params["state"]} if "state" in params else {}
        if params.get("response_type") != "code":
            return redirect_back(redirect_uri, back | {"error": "unsupported_response_type"})
        if "openid" not in params.get("scope", "").split():
            return redirect_back(redirect_uri, back | {"error": "invalid_scope", "error_description": "openid"})
        if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
            return redirect_back(redirect_uri, back | {"error": "invalid_request",
                                                       "error_description": "PKCE with S256 is required"})
        if request.method == "GET":
            client_host = urlsplit(redirect_uri).netloc
            return HTMLResponse(_PAGE.render(region=region, params=params, client_host=f"LabCommons（{client_host}）"))
        if source.get("cancel"):
            return redirect_back(redirect_uri, back | {"error": "access_denied"})
        person = persons.get(str(source.get("sub", "")))
        if person is None:
            return error_page("未知的演示人员 / Unknown demo person.")
        code = secrets.token_urlsafe(32)
        state.codes[code] = _Grant(
            person=person, redirect_uri=redirect_uri, scope=params["scope"], nonce=params.get("nonce"),
            code_challenge=params["code_challenge"], expires_at=time.time() + CODE_LIFETIME_SECONDS,
            auth_time=int(time.time()),
        )
        return redirect_back(redirect_uri, back | {"code": code})

    def client_authenticated(request: Request, form: dict[str, str]) -> bool:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except ValueError:
                return False
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
            client_id, secret = unquote(raw_id.replace("+", " ")), unquote(raw_secret.replace("+", " "))
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        return client_id == region.client_id and hmac.compare_digest(secret.encode(), region.client_secret.encode())

    async def token(request: Request) -> JSONResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not client_authenticated(request, form):
            return oauth_error("invalid_client", "client authentication failed", status=401)
        if form.get("grant_type") != "authorization_code":
            return oauth_error("unsupported_grant_type", "only authorization_code")
        # Popped before any check: a code is spent by its first use, even a failed one.
        grant = state.codes.pop(form.get("code", ""), None)
        if grant is None or grant.expires_at < time.time():
            return oauth_error("invalid_grant", "unknown, used or expired code")
        if form.get("redirect_uri") != grant.redirect_uri:
            return oauth_error("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(_s256(verifier), grant.code_challenge):
            return oauth_error("invalid_grant", "PKCE verification failed")
        now = int(time.time())
        claims = _claims(grant.person, region) | {
            "iss": issuer, "aud": region.client_id, "iat": now, "exp": now + TOKEN_LIFETIME_SECONDS,
            "auth_time": grant.auth_time,
        }
        if grant.nonce:
            claims["nonce"] = grant.nonce
        header = {"alg": "RS256", "kid": state.key.kid, "typ": "JWT"}
        access_token = secrets.token_urlsafe(32)
        state.access_tokens[access_token] = (grant.person, time.time() + TOKEN_LIFETIME_SECONDS)
        return JSONResponse(
            {"access_token": access_token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_SECONDS,
             "scope": grant.scope, "id_token": jwt.encode(header, claims, state.key)},
            headers={"Cache-Control": "no-store"},
        )

    async def userinfo(request: Request) -> JSONResponse:
        header = request.headers.get("authorization", "")
        held = state.access_tokens.get(header[7:].strip()) if header.lower().startswith("bearer ") else None
        if held is None or held[1] < time.time():
            return JSONResponse({"error": "invalid_token"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return JSONResponse(_claims(held[0], region))

    return Starlette(routes=[
        Route("/.well-known/openid-configuration", discovery),
        Route("/jwks", jwks),
        Route("/authorize", authorize, methods=["GET", "POST"]),
        Route("/token", token, methods=["POST"]),
        Route("/userinfo", userinfo, methods=["GET", "POST"]),
    ])


@dataclass
class DemoProviderHandle:
    """A demo provider serving in a background thread; `stop()` shuts it down."""

    region: DemoRegion
    issuer: str
    port: int
    redirect_uris: list[str]
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_in_thread(
    region: DemoRegion | str, port: int = 0, *, host: str = "127.0.0.1", app_base_url: str = DEFAULT_APP_BASE_URL,
    timeout: float = 10.0,
) -> DemoProviderHandle:
    """Start a demo provider on host:port (0 picks a free port) for the platform at `app_base_url`."""
    config_region = DEMO_REGIONS[region] if isinstance(region, str) else region
    # Bound here rather than by uvicorn, so a busy port fails in the caller and port 0 is known before the issuer.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(64)
    port = int(sock.getsockname()[1])
    issuer = f"http://{host}:{port}"
    redirect_uris = [redirect_uri_for(app_base_url, config_region.name)]
    app = create_provider_app(config_region, issuer, redirect_uris)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"demo-idp-{config_region.code}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the demo identity provider for {config_region.code} did not start on {issuer}")
        time.sleep(0.02)
    return DemoProviderHandle(config_region, issuer, port, redirect_uris, server, thread)


def register_demo_provider(session: Session, region: DemoRegion, issuer: str) -> IdentityProvider:
    """Create or update the IdentityProvider row of a demo provider (idempotent: keyed by its name)."""
    provider = session.scalar(select(IdentityProvider).where(IdentityProvider.name == region.name))
    if provider is None:
        provider = IdentityProvider(name=region.name)
        session.add(provider)
    provider.display_name_zh = region.display_name_zh
    provider.display_name_en = region.display_name_en
    provider.region_code = region.code
    provider.issuer = issuer
    provider.client_id = region.client_id
    provider.client_secret = region.client_secret
    provider.scopes = "openid email profile"
    provider.trusted_for_linking = True
    provider.enabled = True
    session.flush()
    return provider


def start_demo_providers(
    ports: dict[str, int], *, app_base_url: str = DEFAULT_APP_BASE_URL
) -> list[DemoProviderHandle]:
    """Start the demo provider of each region in `ports` (region code to port); all or none keep running."""
    handles: list[DemoProviderHandle] = []
    try:
        for code, port in ports.items():
            handles.append(serve_in_thread(code, port, app_base_url=app_base_url))
    except BaseException:
        for handle in handles:
            handle.stop()
        raise
    return handles


def disable_demo_providers(session: Session) -> int:
    """Disable the demo providers' rows, so the sign-in page offers no button that nothing answers."""
    names = [region.name for region in DEMO_REGIONS.values()]
    rows = session.scalars(select(IdentityProvider).where(IdentityProvider.name.in_(names),
                                                          IdentityProvider.enabled.is_(True))).all()
    for row in rows:
        row.enabled = False
    session.flush()
    return len(rows)
