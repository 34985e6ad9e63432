"""Melon's soft fields, read one way by the trainer and the server: dates and lenient reads.

The real ``song_meta.json`` holds issue dates no calendar has (``"20105130"``, a September
31, a day 32) and dates after the data set was published. Structural faults still refuse;
a soft field's dirty value is read as well as it can be, and every such read is counted in
a :class:`LenientReads`, which writes one summary line per kind for its source (a file, a
request). Standard library only: the server imports this, and so does the trainer.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# re.ASCII: \d would otherwise accept any Unicode digit ("٢٠١٩").
_ISSUE_DATE = re.compile(r"\d{8}", re.ASCII)
_UPDT_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?)?", re.ASCII)
UPDT_FORMATS = "YYYY-MM-DD, YYYY-MM-DD hh:mm:ss or YYYY-MM-DD hh:mm:ss.fff"

# Playlists may name songs that song_meta.json lacks: up to this share of a file's song
# entries they are dropped and counted; above it the files do not belong together.
MAX_MISSING_SONG_SHARE = 0.01


def parse_issue_date(text: str) -> tuple[int, str | None]:
    """Melon's ``issue_date`` as YYYYMMDD, and ``None`` or why it was read as a partial date.

    ``"YYYYMMDD"`` with month or day ``00`` for unknown parts, as in ``song_meta.json``;
    ``""`` and ``"00000000"`` mean unknown (0). A date no calendar has keeps what is
    possible: an impossible month keeps the year (``"20105130"`` -> 20100000), an
    impossible day keeps the year and month (``"20150931"`` -> 20150900), a day without a
    month keeps the year, and a month or day without a year is unknown. Future dates are
    kept as they are.

    Raises
    ------
    ValueError
        When ``text`` is not 8 ASCII digits (surrounding spaces aside).
    """
    stripped = text.strip()
    if not stripped:
        return 0, None
    if _ISSUE_DATE.fullmatch(stripped) is None:
        raise ValueError(f"{text[:40]!r} is not YYYYMMDD (8 digits)")
    value = int(stripped)
    year, month, day = value // 10000, value // 100 % 100, value % 100
    if year == 0:
        return 0, None if value == 0 else f"month {month:02d} or day {day:02d} without a year"
    if month > 12:
        return year * 10000, f"month {month:02d} is out of range 01..12"
    if month == 0:
        return year * 10000, None if day == 0 else f"day {day:02d} without a month"
    if day <= 28:  # every month has these (the common case: no calendar lookup)
        return value, None
    last = calendar.monthrange(year, month)[1]
    if day > last:
        return year * 10000 + month * 100, f"day {day:02d} is past {year:04d}-{month:02d}-{last}"
    return value, None


def parse_updt_date(text: str) -> int:
    """Melon's ``updt_date`` (``"YYYY-MM-DD[ hh:mm:ss[.fff]]"``) as YYYYMMDD; ``""`` -> 0.

    Raises
    ------
    ValueError
        When ``text`` is not one of those forms or not a real date and time (2020-02-30).
    """
    stripped = text.strip()
    if not stripped:
        return 0
    match = _UPDT_DATE.fullmatch(stripped)
    try:
        if match is None:
            raise ValueError("bad format")
        year, month, day = (int(g) for g in match.group(1, 2, 3))
        dt.date(year, month, day)
        if match.group(4) is not None:
            hour, minute, second = (int(g) for g in match.group(4, 5, 6))
            dt.time(hour, minute, second)
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not a date; expected {UPDT_FORMATS}") from None
    return year * 10000 + month * 100 + day


def question_updt_date(question: Mapping[str, object]) -> int:
    """A question record's ``updt_date`` as YYYYMMDD, 0 when absent or not a date: offline
    questions are read leniently, as the dataset loader reads playlists, and a question
    without a date is answered as a client that sends none is."""
    try:
        return parse_updt_date(str(question.get("updt_date") or ""))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Kind:
    """One kind of lenient read: what was done (``text``) and what its ids are (``label``)."""

    text: str
    label: str = "ids"


ISSUE_DATE_PARTIAL = Kind("issue dates out of range read as partial dates")


@dataclass
class LenientReads:
    """What one source read leniently: per kind, how many and the first few ids.

    ``note`` counts a record once per kind (``count``: how many of its values were read
    leniently; a second note of the same record and kind is ignored); :meth:`lines` gives
    one summary line per kind, e.g. ``song_meta.json: 3 issue dates out of range read as
    partial dates (ids 692325, 168071, 5)``.
    """

    source: str
    first: int = 3
    counts: dict[Kind, int] = field(default_factory=dict)
    ids: dict[Kind, list[str]] = field(default_factory=dict)
    records: dict[Kind, int] = field(default_factory=dict)
    _last: dict[Kind, str] = field(default_factory=dict, repr=False)

    def note(self, kind: Kind, ident: object, count: int = 1) -> None:
        """Count ``count`` lenient reads of the record ``ident`` (None: a record without an
        id, such as the one song of an ``EncodeSong`` call)."""
        shown = self.ids.setdefault(kind, [])
        if ident is None:
            self.counts[kind] = self.counts.get(kind, 0) + count
            return
        text = str(ident)
        if self._last.get(kind) == text:  # another value of the same record
            return
        self._last[kind] = text
        self.counts[kind] = self.counts.get(kind, 0) + count
        self.records[kind] = self.records.get(kind, 0) + 1
        if len(shown) < self.first:
            shown.append(text)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        out = []
        for kind, count in self.counts.items():
            shown = self.ids[kind]
            line = f"{self.source}: {count} {kind.text}"
            if shown:
                more = ", ..." if self.records[kind] > len(shown) else ""
                line += f" ({kind.label} {', '.join(shown)}{more})"
            out.append(line)
        return out
