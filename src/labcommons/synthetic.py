"""Synthetic catalogues and bookings at benchmark scale (a million rows in minutes), deterministic per seed.

Rows go in through bulk statements rather than the ORM: PostgreSQL's COPY, or Core executemany batches on
SQLite. The search text is still computed by `catalog.service.search_text_for`, so a synthetic instrument is
indexed exactly as one created through `place_instrument`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from time import perf_counter
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select, text

from labcommons.booking.models import Booking
from labcommons.catalog.models import Category, Facility, Institution, Instrument, Region
from labcommons.catalog.service import search_text_for
from labcommons.catalog.text import index_tokens
from labcommons.db import Database, utcnow
from labcommons.identity.models import User

Progress = Callable[[str, int, int], None]

BATCH = 10_000
SQLITE_CACHE_KIB = 256 * 1024
# Codes of synthetic rows start with this, so a second run finds what the first created.
PREFIX = "SYN-"
MAX_INSTITUTIONS = 240
FACILITIES_PER_INSTITUTION = 3
USERS_PER_INSTITUTION = 4
# Bookings lie between PAST_DAYS before and FUTURE_DAYS after the seeding day.
PAST_DAYS = 10
FUTURE_DAYS = 60
# Of the past bookings that were not cancelled: the share missed (no-shows) and the share used with a check-in
# and check-out at the instrument; the rest count as used for their whole booked time.
NO_SHOW_SHARE = 0.05
CHECKED_IN_SHARE = 0.6

REGIONS = (("CQ", "重庆", "Chongqing"), ("SC", "四川", "Sichuan"))
PLACES = {
    "CQ": [
        ("重庆", "Chongqing"),
        ("两江", "Liangjiang"),
        ("渝北", "Yubei"),
        ("沙坪坝", "Shapingba"),
        ("北碚", "Beibei"),
        ("江津", "Jiangjin"),
        ("永川", "Yongchuan"),
        ("璧山", "Bishan"),
        ("涪陵", "Fuling"),
        ("万州", "Wanzhou"),
        ("九龙坡", "Jiulongpo"),
        ("南岸", "Nan'an"),
    ],
    "SC": [
        ("成都", "Chengdu"),
        ("天府", "Tianfu"),
        ("绵阳", "Mianyang"),
        ("德阳", "Deyang"),
        ("宜宾", "Yibin"),
        ("泸州", "Luzhou"),
        ("南充", "Nanchong"),
        ("乐山", "Leshan"),
        ("自贡", "Zigong"),
        ("雅安", "Ya'an"),
        ("眉山", "Meishan"),
        ("遂宁", "Suining"),
    ],
}
THEMES = [
    ("生命科学", "Life Sciences"), ("医学", "Medical"), ("材料", "Materials"), ("信息", "Information"),
    ("农业", "Agricultural"), ("能源", "Energy"), ("环境", "Environmental"), ("生物医药", "Biomedicine"),
    ("精密测量", "Precision Measurement"), ("大数据", "Big Data"), ("先进制造", "Advanced Manufacturing"),
    ("脑科学", "Brain Science")
]
KINDS = [
    ("university", "大学", "University"), ("laboratory", "实验室", "Laboratory"),
    ("laboratory", "研究院", "Research Institute"), ("hospital", "医院", "Hospital"),
    ("company", "科技有限公司", "Technology Co."), ("government", "检验检测中心", "Testing Centre")
]
UNITS = [
    ("公共技术平台", "Core Facility"), ("分析测试中心", "Analysis and Testing Centre"),
    ("成像中心", "Imaging Centre"), ("组学中心", "Omics Centre"), ("计算中心", "Computing Centre"),
    ("实验动物中心", "Laboratory Animal Centre"), ("检测平台", "Testing Platform")
]
# Instrument kinds per leaf category; codes not listed fall back to the category's own names.
STEMS: dict[str, list[tuple[str, str]]] = {
    "ANA.MS": [
        ("质谱仪", "mass spectrometer"),
        ("液质联用仪", "LC-MS system"),
        ("气质联用仪", "GC-MS system"),
    ],
    "ANA.NMR": [
        ("核磁共振波谱仪", "NMR spectrometer"),
        ("固体核磁共振仪", "solid-state NMR"),
    ],
    "ANA.CHROM": [
        ("高效液相色谱仪", "HPLC system"),
        ("气相色谱仪", "gas chromatograph"),
        ("离子色谱仪", "ion chromatograph"),
    ],
    "ANA.SPEC": [
        ("拉曼光谱仪", "Raman spectrometer"),
        ("红外光谱仪", "FTIR spectrometer"),
        ("荧光光谱仪", "fluorescence spectrometer"),
    ],
    "ANA.XRD": [
        ("X射线衍射仪", "X-ray diffractometer"),
        ("小角散射仪", "SAXS instrument"),
    ],
    "ANA.ELEM": [
        ("电感耦合等离子体质谱仪", "ICP-MS"),
        ("原子吸收光谱仪", "atomic absorption spectrometer"),
    ],
    "ANA.THERM": [
        ("差示扫描量热仪", "differential scanning calorimeter"),
        ("热重分析仪", "thermogravimetric analyser"),
    ],
    "MIC.CONF": [
        ("激光共聚焦显微镜", "confocal microscope"),
        ("超分辨显微镜", "super-resolution microscope"),
        ("双光子显微镜", "two-photon microscope"),
    ],
    "MIC.LSFM": [
        ("光片显微镜", "light-sheet microscope"),
    ],
    "MIC.EM": [
        ("冷冻电子显微镜", "cryo electron microscope"),
        ("扫描电子显微镜", "scanning electron microscope"),
        ("透射电子显微镜", "transmission electron microscope"),
    ],
    "MIC.SCAN": [
        ("数字切片扫描仪", "slide scanner"),
        ("病理切片扫描系统", "digital pathology scanner"),
    ],
    "MIC.INVIVO": [
        ("小动物活体成像系统", "in-vivo imaging system"),
        ("小动物磁共振成像仪", "small-animal MRI"),
        ("PET/CT成像系统", "PET/CT scanner"),
    ],
    "GEN.SEQ": [
        ("基因测序仪", "gene sequencer"),
        ("高通量测序仪", "high-throughput sequencer"),
        ("纳米孔测序仪", "nanopore sequencer"),
        ("单分子测序仪", "single-molecule sequencer"),
    ],
    "GEN.SC": [
        ("单细胞文库制备系统", "single-cell library system"),
        ("单细胞分选仪", "single-cell sorter"),
    ],
    "GEN.SPATIAL": [
        ("时空组学平台", "spatial omics platform"),
        ("空间转录组芯片系统", "spatial transcriptomics system"),
    ],
    "GEN.PROT": [
        ("蛋白质组学质谱仪", "proteomics mass spectrometer"),
        ("代谢组学平台", "metabolomics platform"),
    ],
    "GEN.PCR": [
        ("实时荧光定量PCR仪", "real-time PCR system"),
        ("数字PCR仪", "digital PCR system"),
    ],
    "CYT.FLOW": [
        ("流式细胞仪", "flow cytometer"),
        ("流式细胞分选仪", "flow cell sorter"),
        ("质谱流式细胞仪", "mass cytometer"),
    ],
    "CYT.HCS": [
        ("高内涵成像系统", "high-content imaging system"),
        ("活细胞工作站", "live-cell workstation"),
    ],
    "ANI.HOUSE": [
        ("SPF屏障动物房", "SPF barrier animal room"),
        ("独立通风笼具系统", "IVC caging system"),
    ],
    "ANI.MODEL": [
        ("动物手术平台", "animal surgery suite"),
        ("基因编辑动物模型平台", "gene-edited model platform"),
    ],
    "ANI.BEH": [
        ("动物行为学分析系统", "animal behaviour system"),
        ("在体电生理记录系统", "in-vivo electrophysiology rig"),
    ],
    "CMP.HPC": [
        ("高性能计算集群", "HPC cluster partition"),
        ("生命科学超级计算机", "life-science supercomputer"),
    ],
    "CMP.GPU": [
        ("GPU计算节点", "GPU compute node"),
        ("人工智能算力平台", "AI computing platform"),
    ],
    "CMP.DATA": [
        ("生物医学大数据平台", "biomedical big-data platform"),
    ],
    "CMP.STOR": [
        ("科研数据存储系统", "research data storage"),
    ],
    "MED.IVD": [
        ("全自动生化分析仪", "clinical chemistry analyser"),
        ("化学发光免疫分析仪", "chemiluminescence analyser"),
    ],
    "MED.PATH": [
        ("全自动免疫组化染色机", "IHC stainer"),
        ("组织切片机", "microtome"),
    ],
    "MED.BIOBANK": [
        ("深低温样本库", "cryogenic biobank"),
        ("自动化样本存储系统", "automated sample store"),
    ],
    "MAT.MECH": [
        ("万能材料试验机", "universal testing machine"),
        ("纳米压痕仪", "nanoindenter"),
    ],
    "MAT.SURF": [
        ("X射线光电子能谱仪", "XPS spectrometer"),
        ("原子力显微镜", "atomic force microscope"),
    ],
    "MAT.ENV": [
        ("高低温湿热试验箱", "climatic test chamber"),
        ("盐雾试验箱", "salt spray chamber"),
    ],
    "ELE.MEAS": [
        ("矢量网络分析仪", "vector network analyser"),
        ("高速示波器", "high-speed oscilloscope"),
    ],
    "ELE.CAL": [
        ("多功能校准源", "multifunction calibrator"),
        ("标准电能表检定装置", "energy meter test bench"),
    ],
    "FAC.TRANS": [
        ("超瞬态实验装置", "transient experiment facility"),
        ("飞秒激光系统", "femtosecond laser system"),
    ],
    "FAC.OTHER": [
        ("大型综合实验装置", "large experimental facility"),
    ],
}
ADJECTIVES = [
    ("高分辨", "High-resolution"), ("全自动", "Automated"), ("超高速", "Ultra-fast"),
    ("多功能", "Multi-purpose"), ("便携式", "Portable"), ("台式", "Benchtop"),
    ("高灵敏", "High-sensitivity")
]
MAKERS = [
    "Thermo Fisher", "Zeiss", "Leica", "Nikon", "Olympus", "Bruker", "Agilent", "Waters", "Shimadzu",
    "Illumina", "MGI", "Oxford Nanopore", "BD", "Beckman Coulter", "Hitachi", "JEOL", "Sciex", "Roche",
    "联影", "迈瑞", "华大智造", "中科科仪", "聚光科技", "舜宇", "曙光", "浪潮"
]
FEATURES = [
    ("配备自动进样器", "with an autosampler"), ("支持远程数据传输", "with remote data transfer"),
    ("具备低温样品台", "with a cryogenic stage"), ("可进行长时间连续采集", "for long unattended runs"),
    ("灵敏度高、通量大", "combining high sensitivity and throughput"),
    ("配套专用分析软件", "with dedicated analysis software")
]
USES = [
    ("适用于肿瘤微环境研究", "Suited to tumour microenvironment studies"),
    ("用于新药研发与质量控制", "Used for drug discovery and quality control"),
    ("服务于脑科学与神经发育研究", "Serves brain science and neurodevelopment projects"),
    ("支持环境样品与食品安全检测", "Supports environmental and food-safety testing"),
    ("面向新材料表征", "Aimed at new-materials characterisation"),
    ("用于单细胞与类器官研究", "Used in single-cell and organoid research"),
    ("服务成渝地区企业与高校", "Open to companies and universities across Chengdu and Chongqing")
]
LETTERS = "ABCDEFGHKLMNPRSTXZ"
BUILDINGS = [
    ("A栋", "Building A"), ("B栋", "Building B"), ("C栋", "Building C"), ("科研楼", "Research Building"),
    ("创新中心", "Innovation Hub"),
]
PURPOSES = [
    "小鼠脑切片空间转录组", "Tumour microenvironment imaging", "全基因组重测序 30X",
    "Cryo-EM grid screening", "类器官活细胞成像", "Metabolomics of plasma samples", "单细胞文库质检",
    "Batch flow sorting of T cells", "", "",
]


@dataclass
class SyntheticSeed:
    """What one run added, and how long each bulk stage took."""

    institutions: int = 0
    facilities: int = 0
    users: int = 0
    instruments: int = 0
    bookings: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Placed:
    """What bookings need to know about an instrument."""

    id: int
    institution_id: int
    region_code: str
    open_to: str
    slot: int
    min_minutes: int
    max_minutes: int


def seed_synthetic(
    db: Database,
    *,
    instruments: int,
    bookings: int,
    seed: int,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> SyntheticSeed:
    """Add `instruments` instruments and `bookings` non-overlapping bookings around `now` (default: today).

    Regions, institutions, facilities and users are created when missing; instruments and bookings are
    appended. The same seed on the same empty database and day gives the same rows.
    """
    rng = random.Random(seed)
    report = SyntheticSeed()
    day = (now or utcnow()).astimezone(UTC)
    day = datetime.combine(day.date(), time(), UTC)
    notify = progress or (lambda _stage, _done, _total: None)
    with db.engine.begin() as conn:
        _ensure_regions(conn)
        institutions = _ensure_institutions(conn, rng, report, notify)
        facilities = _ensure_facilities(conn, rng, institutions, report)
        users = _ensure_users(conn, institutions, report, day)
    categories = _leaf_categories(db)
    started = perf_counter()
    placed = _insert_instruments(db, rng, instruments, facilities, categories, day, notify)
    report.instruments = len(placed)
    report.seconds["instruments"] = perf_counter() - started
    started = perf_counter()
    report.bookings = _insert_bookings(db, rng, bookings, placed, institutions, users, day, notify)
    report.seconds["bookings"] = perf_counter() - started
    started = perf_counter()
    _analyze(db)
    report.seconds["analyze"] = perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------------------
# Regions, institutions, facilities, users: a few hundred rows, plain Core inserts.


def _ensure_regions(conn: Connection) -> None:
    have = set(conn.scalars(select(Region.code)))
    rows = [{"code": c, "name_zh": zh, "name_en": en} for c, zh, en in REGIONS if c not in have]
    if rows:
        conn.execute(insert(Region), rows)


@dataclass(frozen=True)
class _Org:
    id: int
    code: str
    region_code: str
    name_zh: str
    name_en: str


def _ensure_institutions(
    conn: Connection, rng: random.Random, report: SyntheticSeed, notify: Progress
) -> list[_Org]:
    wanted: list[dict[str, Any]] = []
    for n in range(MAX_INSTITUTIONS):
        region = REGIONS[n % 2][0]
        place_zh, place_en = rng.choice(PLACES[region])
        theme_zh, theme_en = rng.choice(THEMES)
        kind, kind_zh, kind_en = rng.choice(KINDS)
        wanted.append({
            "code": f"{PREFIX}{region}-{n:04d}", "region_code": region, "kind": kind,
            "name_zh": f"{place_zh}{theme_zh}{kind_zh}", "name_en": f"{place_en} {theme_en} {kind_en}",
        })
    have = set(conn.scalars(select(Institution.code).where(Institution.code.like(f"{PREFIX}%"))))
    missing = [row for row in wanted if row["code"] not in have]
    if missing:
        conn.execute(insert(Institution), missing)
    report.institutions = len(missing)
    notify("institutions", len(wanted), len(wanted))
    rows = conn.execute(
        select(Institution.id, Institution.code, Institution.region_code, Institution.name_zh,
               Institution.name_en)
        .where(Institution.code.in_([r["code"] for r in wanted]))
        .order_by(Institution.code)
    )
    return [_Org(*row) for row in rows]


def _ensure_facilities(
    conn: Connection, rng: random.Random, institutions: list[_Org], report: SyntheticSeed
) -> list[tuple[_Org, _Org]]:
    """(facility, its institution) pairs."""
    wanted: list[dict[str, Any]] = []
    for inst in institutions:
        for k, (unit_zh, unit_en) in enumerate(rng.sample(UNITS, FACILITIES_PER_INSTITUTION)):
            wanted.append({
                "code": f"{inst.code}-F{k}", "institution_id": inst.id, "name_zh": f"{inst.name_zh}{unit_zh}",
                "name_en": f"{unit_en}, {inst.name_en}", "description_zh": "", "description_en": "",
            })
    have = set(conn.scalars(select(Facility.code).where(Facility.code.like(f"{PREFIX}%"))))
    missing = [row for row in wanted if row["code"] not in have]
    if missing:
        conn.execute(insert(Facility), missing)
    report.facilities = len(missing)
    by_id = {i.id: i for i in institutions}
    rows = conn.execute(
        select(Facility.id, Facility.code, Facility.institution_id, Facility.name_zh, Facility.name_en)
        .where(Facility.code.in_([r["code"] for r in wanted]))
        .order_by(Facility.code)
    )
    return [(_Org(fid, code, by_id[iid].region_code, zh, en), by_id[iid]) for fid, code, iid, zh, en in rows]


def _ensure_users(
    conn: Connection, institutions: list[_Org], report: SyntheticSeed, day: datetime
) -> dict[int, list[int]]:
    """User ids by institution id."""
    wanted = [
        {"email": f"syn{k}.{inst.code.lower()}@synthetic.example.org", "name": f"Synthetic user {k}",
         "institution_id": inst.id, "region_code": inst.region_code, "password_hash": None, "is_active": True,
         "created_at": day}
        for inst in institutions
        for k in range(USERS_PER_INSTITUTION)
    ]
    have = set(conn.scalars(select(User.email).where(User.email.like("%@synthetic.example.org"))))
    missing = [row for row in wanted if row["email"] not in have]
    if missing:
        conn.execute(insert(User), missing)
    report.users = len(missing)
    users: dict[int, list[int]] = {}
    for user_id, institution_id in conn.execute(
        select(User.id, User.institution_id)
        .where(User.email.like("%@synthetic.example.org"))
        .order_by(User.id)
    ):
        if institution_id is not None:
            users.setdefault(institution_id, []).append(user_id)
    return users


def _leaf_categories(db: Database) -> list[Category]:
    with db.session() as session:
        categories = list(session.scalars(select(Category).order_by(Category.code)))
        session.expunge_all()
    parents = {c.parent_code for c in categories}
    return [c for c in categories if c.code not in parents]


# ---------------------------------------------------------------------------------------------------------
# Instruments and bookings: generated lazily, written in batches.


def _next_id(conn: Connection, table: Table) -> int:
    return int(conn.scalar(select(func.coalesce(func.max(table.c.id), 0))) or 0) + 1


def _instrument_rows(
    rng: random.Random,
    count: int,
    first_id: int,
    first_number: int,
    facilities: list[tuple[_Org, _Org]],
    categories: list[Category],
    day: datetime,
) -> Iterator[tuple[dict[str, Any], _Placed]]:
    # rng.random() indexing instead of choice()/randint(): a third of the cost at a million rows.
    uniform = rng.random

    def pick(options: Sequence[Any]) -> Any:
        return options[int(uniform() * len(options))]

    # Facilities specialise: each draws its instruments from a few categories, like a real core facility.
    specialities = {f.id: rng.sample(categories, min(4, len(categories))) for f, _ in facilities}
    tokens = _TokenMemo()
    for n in range(count):
        facility, institution = pick(facilities)
        category = pick(specialities[facility.id]) if uniform() < 0.8 else pick(categories)
        stem_zh, stem_en = pick(STEMS.get(category.code) or [(category.name_zh, category.name_en)])
        adj_zh, adj_en = pick(ADJECTIVES) if uniform() < 0.5 else ("", "")
        maker = pick(MAKERS)
        model = f"{pick(LETTERS)}{pick(LETTERS)}-{100 + int(uniform() * 9900)}"
        feature_zh, feature_en = pick(FEATURES)
        use_zh, use_en = pick(USES)
        building_zh, building_en = pick(BUILDINGS)
        floor = 1 + int(uniform() * 12)
        room = f"{floor}{1 + int(uniform() * 40):02d}"
        slot = pick((15, 30, 30, 60, 60))
        min_minutes = slot * pick((1, 2)) if slot < 60 else 60 * pick((1, 1, 2))
        roll = uniform()
        status = "active" if roll < 0.92 else "maintenance" if roll < 0.98 else "retired"
        roll = uniform()
        open_to = "everyone" if roll < 0.7 else "region" if roll < 0.9 else "institution"
        created = day - timedelta(days=30 + int(uniform() * 2000), minutes=int(uniform() * 1440))
        row: dict[str, Any] = {
            "id": first_id + n, "code": f"{PREFIX}I{first_number + n:07d}", "facility_id": facility.id,
            "institution_id": institution.id, "region_code": institution.region_code,
            "name_zh": f"{adj_zh}{stem_zh}", "name_en": f"{adj_en} {stem_en}".strip().capitalize(),
            "description_zh": f"{maker}{stem_zh}，{feature_zh}。{use_zh}。",
            "description_en": f"{maker} {stem_en} {feature_en}. {use_en}.",
            "manufacturer": maker, "model": model, "category_code": category.code,
            "location_zh": f"{institution.name_zh} {building_zh} {floor}层 {room}室",
            "location_en": f"{institution.name_en}, {building_en}, Floor {floor}, Room {room}",
            "status": status, "slot_minutes": slot, "min_booking_minutes": min_minutes,
            "max_booking_minutes": pick((240, 480, 480, 720, 1440)), "open_to": open_to,
            "created_at": created, "updated_at": created,
        }
        row["search_name"], row["search_body"] = tokens.search_text(row, facility, institution, category)
        if n % 1000 == 0:
            _check_search_text(row, facility, institution, category)
        yield row, _Placed(row["id"], institution.id, institution.region_code, open_to, slot, min_minutes,
                           row["max_booking_minutes"])


class _TokenMemo:
    """`search_text_for` with each repeated word tokenised once: a fifth of its cost at a million rows.

    Tokens never span a space or a text boundary, so joining per-word tokens equals tokenising the texts.
    """

    def __init__(self) -> None:
        self._memo: dict[str, str] = {}

    def _of(self, text: str) -> str:
        memo = self._memo
        out = []
        for word in text.split(" "):
            found = memo.get(word)
            if found is None:
                found = memo[word] = index_tokens(word)
            if found:
                out.append(found)
        return " ".join(out)

    def search_text(
        self, row: dict[str, Any], facility: _Org, institution: _Org, category: Category
    ) -> tuple[str, str]:
        of = self._of
        # Codes and models are unique per row: not worth remembering.
        name = (of(row["name_zh"]), of(row["name_en"]), index_tokens(row["code"]), index_tokens(row["model"]),
                of(row["manufacturer"]))
        body = (
            of(row["description_zh"]), of(row["description_en"]), of(category.name_zh), of(category.name_en),
            of(category.code.replace(".", " ")), of(facility.name_zh), of(facility.name_en),
            of(institution.name_zh), of(institution.name_en), of(row["location_zh"]), of(row["location_en"]),
        )
        return " ".join(t for t in name if t), " ".join(t for t in body if t)


def _check_search_text(row: dict[str, Any], facility: _Org, institution: _Org, category: Category) -> None:
    # Guards against search_text_for gaining a field that _TokenMemo does not know about.
    expected = search_text_for(
        cast(Instrument, SimpleNamespace(**row)), cast(Facility, facility), cast(Institution, institution),
        category,
    )
    if expected != (row["search_name"], row["search_body"]):
        raise RuntimeError("synthetic search text differs from search_text_for: update _TokenMemo")


def _insert_instruments(
    db: Database,
    rng: random.Random,
    count: int,
    facilities: list[tuple[_Org, _Org]],
    categories: list[Category],
    day: datetime,
    notify: Progress,
) -> list[_Placed]:
    table = cast(Table, Instrument.__table__)
    with db.engine.connect() as conn:
        first_id = _next_id(conn, table)
        first_number = int(conn.scalar(
            select(func.count()).select_from(table).where(table.c.code.like(f"{PREFIX}I%"))
        ) or 0)
    placed: list[_Placed] = []

    def rows() -> Iterator[dict[str, Any]]:
        for row, place in _instrument_rows(rng, count, first_id, first_number, facilities, categories, day):
            placed.append(place)
            yield row

    _bulk_insert(db, table, rows(), count, "instruments", notify)
    return placed


def _booking_rows(
    rng: random.Random,
    count: int,
    first_id: int,
    placed: Sequence[_Placed],
    institutions: list[_Org],
    users: dict[int, list[int]],
    day: datetime,
) -> Iterator[dict[str, Any]]:
    """Bookings spread over the instruments (unevenly, as real demand is) and laid out without overlap."""
    if not placed or count <= 0:
        return
    # Each booking's holder is someone the instrument is open to.
    everyone = [user for institution in institutions for user in users.get(institution.id, [])]
    region_users: dict[str, list[int]] = {}
    for institution in institutions:
        region_users.setdefault(institution.region_code, []).extend(users.get(institution.id, []))
    weights = [0.3 + rng.random() * 1.4 for _ in placed]
    counts = [0] * len(placed)
    for index in rng.choices(range(len(placed)), weights, k=count):
        counts[index] += 1
    window_start = day - timedelta(days=PAST_DAYS)
    window = (PAST_DAYS + FUTURE_DAYS) * 1440
    uniform = rng.random
    booking_id = first_id
    for instrument, k in zip(placed, counts, strict=True):
        if not k:
            continue
        slot = instrument.slot
        # Each booking gets its own segment of the window, so none can overlap; a crowded instrument's
        # window stretches until every segment holds its longest allowed booking.
        segment = max(window // k, instrument.min_minutes + slot)
        segment -= segment % slot
        if instrument.open_to == "institution":
            pool = users.get(instrument.institution_id) or everyone
        elif instrument.open_to == "region":
            pool = region_users.get(instrument.region_code) or everyone
        else:
            pool = everyone
        shortest = instrument.min_minutes // slot
        longest = max(shortest, min(instrument.max_minutes, 240, segment) // slot)
        for j in range(k):
            length = slot * (shortest + int(uniform() * (longest - shortest + 1)))
            offset = slot * int(uniform() * ((segment - length) // slot + 1))
            starts_at = window_start + timedelta(minutes=j * segment + offset)
            ends_at = starts_at + timedelta(minutes=length)
            created_at = min(starts_at, day) - timedelta(minutes=1440 + int(uniform() * 20 * 1440))
            roll = uniform()
            checked_in_at = checked_out_at = None
            no_show = False
            if roll < 0.08:
                status, cancelled_at = "cancelled", created_at + timedelta(minutes=60 + int(uniform() * 2880))
            elif ends_at <= day:
                status, cancelled_at = "completed", None
                usage = uniform()
                if usage < NO_SHOW_SHARE:
                    # As booking.usage records it: the booking stays confirmed, flagged, never checked in.
                    status, no_show = "confirmed", True
                elif usage < NO_SHOW_SHARE + CHECKED_IN_SHARE:
                    checked_in_at, checked_out_at = _usage_span(uniform, starts_at, ends_at)
            else:
                status, cancelled_at = ("pending" if roll > 0.97 else "confirmed"), None
            yield {
                "id": booking_id, "instrument_id": instrument.id, "user_id": pool[int(uniform() * len(pool))],
                "starts_at": starts_at, "ends_at": ends_at, "status": status,
                "purpose": PURPOSES[int(uniform() * len(PURPOSES))], "created_at": created_at,
                "cancelled_at": cancelled_at, "checked_in_at": checked_in_at, "checked_out_at": checked_out_at,
                "no_show": no_show,
            }
            booking_id += 1


def _usage_span(uniform: Callable[[], float], starts_at: datetime, ends_at: datetime) -> tuple[datetime, datetime]:
    """Check-in a little before or after the start, check-out before the end: used time shorter than booked."""
    length = int((ends_at - starts_at).total_seconds()) // 60
    checked_in_at = starts_at + timedelta(minutes=int(uniform() * 25) - 10)
    # Up to a third of the booking (at most 90 minutes) is left unused at the end.
    unused = int(uniform() * min(length // 3, 90))
    checked_out_at = max(ends_at - timedelta(minutes=unused), checked_in_at + timedelta(minutes=1))
    return checked_in_at, checked_out_at


def _insert_bookings(
    db: Database,
    rng: random.Random,
    count: int,
    placed: Sequence[_Placed],
    institutions: list[_Org],
    users: dict[int, list[int]],
    day: datetime,
    notify: Progress,
) -> int:
    table = cast(Table, Booking.__table__)
    with db.engine.connect() as conn:
        first_id = _next_id(conn, table)
    rows = _booking_rows(rng, count, first_id, placed, institutions, users, day)
    return _bulk_insert(db, table, rows, count if placed else 0, "bookings", notify)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _bulk_insert(
    db: Database, table: Table, rows: Iterable[dict[str, Any]], total: int, stage: str, notify: Progress
) -> int:
    """Write rows in batches, one transaction each, reporting progress after each; returns the count."""
    done = 0
    notify(stage, 0, total)
    with db.engine.connect() as conn:
        if db.is_sqlite:
            # A large page cache keeps the indexes being filled in memory: several times faster at 1M rows.
            conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            conn.commit()
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BATCH:
                _write(conn, table, batch)
                done += len(batch)
                notify(stage, done, total)
                batch = []
        if batch:
            _write(conn, table, batch)
            done += len(batch)
        if db.is_sqlite:
            conn.exec_driver_sql("PRAGMA cache_size=-2000")
        elif done:
            # Explicit ids leave the serial sequence behind; the application's next insert must not collide.
            conn.execute(
                text(f"SELECT setval(pg_get_serial_sequence(:name, 'id'), (SELECT max(id) FROM {table}))"),
                {"name": table.name},
            )
        conn.commit()
    notify(stage, done, total)
    return done


def _write(conn: Connection, table: Table, batch: list[dict[str, Any]]) -> None:
    with conn.begin():
        if conn.dialect.name != "postgresql":
            conn.execute(insert(table), batch)
            return
        raw = conn.connection.driver_connection
        assert raw is not None
        columns = list(batch[0])
        quoted = ", ".join(f'"{c}"' for c in columns)
        with raw.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
            for row in batch:
                copy.write_row([row[c] for c in columns])


def _analyze(db: Database) -> None:
    """Refresh planner statistics (and, on SQLite, merge the full-text index's segments)."""
    if db.is_sqlite:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO instrument_fts(instrument_fts) VALUES ('optimize')")
            conn.exec_driver_sql("ANALYZE")
            conn.exec_driver_sql("PRAGMA optimize")
        return
    # VACUUM cannot run inside a transaction; it also sets the visibility map that index-only scans need.
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("institution", "facility", "user_account", "instrument", "booking"):
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
