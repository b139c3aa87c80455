"""The dashboard's HTML: pages rendered on the server, with no script at all.

Every value from a store is user data (event payloads, error texts, bus names) and goes
through :func:`html.escape`; the app also sends a Content-Security-Policy that forbids
scripts. Auto-refresh is a ``<meta http-equiv="refresh">``; confirmations are pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from ..stores.records import DeadLetter, DeadLetterStats
from .records import MonitorEntry, MonitorPage, MonitorStatus, MonitorSummary
from .status import ConsumerStatus, group_views

__all__: list[str] = []

#: Oplog headroom under this many seconds shows as a warning.
HEADROOM_WARNING = 3600.0

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2d3d;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:center}
header a{color:#cfe3ff;text-decoration:none}header a.on{color:#fff;font-weight:600;border-bottom:2px solid #fff}
header b{font-size:1.1em;margin-right:1em}main{padding:1em 1.5em}
table{border-collapse:collapse;width:100%;background:#fff;margin:.5em 0 1.5em}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.time,td.actions{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
.healthy{color:#17803d}.degraded{color:#b26b00}.unhealthy{color:#c62828}.warn{background:#fff4d6}
.err{color:#c62828;max-width:40em;word-break:break-word}
.tiles{display:flex;gap:1em;margin:.5em 0 1em}.tile{background:#fff;padding:.6em 1em;border:1px solid #e3e6ea}
.tile b{display:block;font-size:1.4em}
form.filters{background:#fff;padding:.6em;border:1px solid #e3e6ea;display:flex;gap:.8em;flex-wrap:wrap;align-items:end}
form.filters label{display:flex;flex-direction:column;font-size:.85em}
button,.button{padding:.25em .8em;border:1px solid #8895a7;background:#fff;border-radius:3px;cursor:pointer;
color:#222;text-decoration:none;font:inherit}
.danger{border-color:#c62828;color:#c62828}.primary{background:#1f6feb;color:#fff;border-color:#1f6feb}
.note{background:#eef6ff;border:1px solid #b6d4fe;padding:.6em 1em;margin:.5em 0}
.done{background:#e8f5e9;border:1px solid #a5d6a7;padding:.6em 1em;margin:.5em 0}
pre{background:#fff;border:1px solid #e3e6ea;padding:.8em;overflow:auto;max-height:30em}
svg{background:#fff;border:1px solid #e3e6ea}
"""


def _e(value: Any) -> str:
    """Escaped text of ``value`` (``—`` for None)."""
    if value is None:
        return "—"
    if isinstance(value, datetime):  # to the second: enough for an operator, and it fits a cell
        return escape(value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"))
    return escape(str(value), quote=True)


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


def _link(base: str, path: str, params: Mapping[str, Any] | None = None) -> str:
    query = urlencode({k: v for k, v in (params or {}).items() if v not in (None, "")})
    return escape(f"{base}{path}" + (f"?{query}" if query else ""), quote=True)


def page(title: str, body: str, *, base: str, active: str, refresh: int | None = None) -> str:
    """A whole HTML document around ``body`` (already escaped)."""
    nav = "".join(
        f'<a href="{_link(base, path)}" class="{"on" if key == active else ""}">{label}</a>'
        for key, path, label in (
            ("overview", "/", "Overview"),
            ("events", "/events", "Events"),
            ("dead-letters", "/dead-letters", "Dead letters"),
        )
    )
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
        f"<title>{_e(title)} · mongo-events</title><style>{_CSS}</style></head>"
        f"<body><header><b>mongo-events</b>{nav}</header><main><h1>{_e(title)}</h1>{body}</main></body></html>"
    )


def chart(history: Iterable[Sequence[int]], *, width: int = 600, height: int = 90) -> str:
    """Processed (green) and failed (red) per minute as stacked bars, inline SVG."""
    minutes: dict[int, list[int]] = {}
    for start, processed, failed in history:
        bucket = minutes.setdefault(int(start), [0, 0])
        bucket[0] += int(processed)
        bucket[1] += int(failed)
    now = int(datetime.now(timezone.utc).timestamp() // 60 * 60)
    slots = [now - 60 * i for i in range(29, -1, -1)]
    peak = max([sum(minutes.get(s, (0, 0))) for s in slots] + [1])
    bar = width / len(slots)
    parts = [
        f'<svg role="img" aria-label="processed and failed per minute, last 30 minutes" width="{width}" '
        f'height="{height + 16}" viewBox="0 0 {width} {height + 16}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, start in enumerate(slots):
        processed, failed = minutes.get(start, (0, 0))
        x = i * bar + 1
        h_ok = height * processed / peak
        h_bad = height * failed / peak
        label = (
            f"{datetime.fromtimestamp(start, timezone.utc):%H:%M} UTC: {processed} processed, {failed} failed"
        )
        parts.append(f'<g class="minute"><title>{escape(label)}</title>')
        if processed:
            parts.append(
                f'<rect class="ok" x="{x:.1f}" y="{height - h_ok - h_bad:.1f}" width="{bar - 2:.1f}" '
                f'height="{h_ok:.1f}" fill="#43a047"/>'
            )
        if failed:
            parts.append(
                f'<rect class="bad" x="{x:.1f}" y="{height - h_bad:.1f}" width="{bar - 2:.1f}" '
                f'height="{h_bad:.1f}" fill="#e53935"/>'
            )
        parts.append("</g>")
    parts.append(
        f'<text x="2" y="{height + 13}" font-size="11" fill="#555">30 min ago</text>'
        f'<text x="{width - 2}" y="{height + 13}" font-size="11" fill="#555" text-anchor="end">now '
        f"(peak {peak}/min)</text></svg>"
    )
    return "".join(parts)


def overview(
    base: str,
    statuses: Sequence[ConsumerStatus],
    summary: MonitorSummary | None,
    stats: DeadLetterStats | None,
    *,
    status_error: str | None = None,
) -> str:
    now = datetime.now(timezone.utc)
    live = sum(1 for s in statuses if s.is_live(now))
    stale = sum(1 for s in statuses if s.is_stale(now))
    ended = len(statuses) - live - stale  # fresh final statuses: stopped or failed
    tiles = [f'<div class="tile"><b>{live}</b>consumers</div>']
    if stale:
        tiles.append(f'<div class="tile"><b class="unhealthy">{stale}</b>stale (no heartbeat)</div>')
    if ended:
        tiles.append(f'<div class="tile"><b>{ended}</b>stopped or failed</div>')
    if summary is not None:
        tiles.append(f'<div class="tile"><b>{summary.total_entries:,}</b>monitor entries</div>')
        tiles.append(f'<div class="tile"><b>{summary.by_status.get("failed", 0):,}</b>failed entries</div>')
    if stats is not None:
        tiles.append(
            f'<div class="tile"><b><a href="{_link(base, "/dead-letters")}">{stats.pending:,}</a></b>'
            "dead letters to replay</div>"
        )
    body = [f'<div class="tiles">{"".join(tiles)}</div>']
    body.append("<h2>Processed and failed per minute</h2>")
    body.append(chart(h for s in statuses for h in s.history))
    body.append("<h2>Consumers</h2>")
    if status_error:
        body.append(f'<p class="note">Cannot read consumer statuses: {_e(status_error)}</p>')
    if not statuses:
        body.append(
            '<p class="note">No consumer has published its status. Pass <code>status=</code> to each '
            "<code>Bus</code> (a <code>MongoConsumerStatusStore</code>) to see them here.</p>"
        )
    else:
        rows = []
        for s in statuses:
            effective = s.effective_status(now)
            processed, failed = s.per_minute()
            low = s.oplog_headroom is not None and s.oplog_headroom < HEADROOM_WARNING
            state = f"{s.state} (stale)" if s.is_stale(now) else s.state
            rows.append(
                f'<tr class="consumer" data-bus="{_e(s.bus)}">'
                f"<td>{_e(s.bus)}<br><small>{_e(s.namespace)}</small></td>"
                f"<td>{_e(s.host)}:{_e(s.pid)}</td>"
                f'<td class="{_e(effective)}">{_e(effective)}<br><small>{_e(state)}</small></td>'
                f'<td class="num">{_seconds(s.lag)}</td>'
                f'<td class="num">{_seconds(s.checkpoint_age)}</td>'
                f'<td class="num{" warn" if low else ""}">{_seconds(s.oplog_headroom)}</td>'
                f'<td class="num">{_e(s.pending)}</td>'
                f'<td class="num">{processed:,}</td><td class="num">{failed:,}</td>'
                f'<td class="num">{_seconds((now - s.heartbeat_at).total_seconds())} ago</td>'
                f'<td class="err">{_e(s.last_error) if s.last_error else ""}</td></tr>'
            )
        body.append(
            '<table id="consumers"><tr><th>Bus</th><th>Process</th><th>Status</th><th>Lag</th>'
            "<th>Checkpoint age</th><th>Oplog headroom</th><th>Pending</th><th>Processed/min</th>"
            f"<th>Failed/min</th><th>Heartbeat</th><th>Last error</th></tr>{''.join(rows)}</table>"
        )
    views = group_views(statuses, now)
    if views:
        rows = []
        for g in views:
            owners = ", ".join(
                f"{_e(s.host)}:{_e(s.pid)} [{_e(', '.join(map(str, s.partitions)))}]" for s in g.members
            )
            unheld = "?" if g.unheld is None else ", ".join(map(str, g.unheld))
            contested = (
                f'<br><small class="warn">claimed twice: {_e(", ".join(map(str, g.contested)))}</small>'
                if g.contested
                else ""
            )
            inactive = ", ".join(
                f'<span class="inactive">{_e(s.host)}:{_e(s.pid)} '
                f"({'stale' if s.is_stale(now) else _e(s.state)}, heartbeat "
                f"{_seconds((now - s.heartbeat_at).total_seconds())} ago)</span>"
                for s in g.inactive
            )
            rows.append(
                f'<tr class="group"><td>{_e(g.group)}</td><td>{_e(g.namespace)}</td>'
                f'<td class="num">{_e(g.partition_count)}</td><td class="owners">{owners or "none"}{contested}</td>'
                f'<td class="unheld{" unhealthy" if g.unheld else ""}">{unheld}</td>'
                f'<td class="inactive">{inactive}</td></tr>'
            )
        body.append(
            '<h2>Groups</h2><table id="groups"><tr><th>Group</th><th>Namespace</th><th>Partitions</th>'
            "<th>Partition owners (live)</th><th>Held by no live member</th><th>Stale, stopped or failed</th></tr>"
            f"{''.join(rows)}</table>"
        )
    return page("Overview", "".join(body), base=base, active="overview", refresh=10)


_EVENT_FILTERS = ("status", "subscription_id", "start_time", "end_time", "min_duration")


def events(base: str, result: MonitorPage, params: Mapping[str, str]) -> str:
    options = "".join(
        f'<option value="{s.value}"{" selected" if params.get("status") == s.value else ""}>{s.value}</option>'
        for s in MonitorStatus
    )
    form = (
        f'<form class="filters" method="get" action="{_link(base, "/events")}">'
        f'<label>Status<select name="status"><option value="">any</option>{options}</select></label>'
        f'<label>Subscription<input name="subscription_id" value="{_e(params.get("subscription_id", ""))}"></label>'
        f'<label>From (RFC 3339)<input name="start_time" value="{_e(params.get("start_time", ""))}" '
        'placeholder="2026-01-31T12:00:00Z"></label>'
        f'<label>To<input name="end_time" value="{_e(params.get("end_time", ""))}"></label>'
        f'<label>Min duration<input name="min_duration" size="6" value="{_e(params.get("min_duration", ""))}" '
        'placeholder="250ms"></label><button type="submit">Filter</button></form>'
    )
    rows = "".join(_entry_row(base, e) for e in result.entries)
    table = (
        '<table id="events"><tr><th>Started</th><th>Event</th><th>Subscription</th><th>Namespace</th>'
        f"<th>Status</th><th>Retries</th><th>Duration</th><th>Error</th></tr>{rows}</table>"
        if result.entries
        else '<p class="note">No entries match.</p>'
    )
    more = ""
    if result.has_more and result.next_cursor:
        kept = {k: params[k] for k in _EVENT_FILTERS if params.get(k)}
        more = f'<a class="button" id="next" href="{_link(base, "/events", {**kept, "cursor": result.next_cursor})}">Next page</a>'
    return page("Events", form + table + more, base=base, active="events")


def _entry_row(base: str, e: MonitorEntry) -> str:
    status = e.status.value
    css = {"completed": "healthy", "failed": "unhealthy", "retrying": "degraded"}.get(status, "")
    duration = f"{e.duration_ms:,.0f} ms" if e.duration_ms is not None else "—"
    return (
        f'<tr class="entry"><td class="time">{_e(e.started_at)}</td>'
        f'<td><a href="{_link(base, "/events/" + quote(e.event_id, safe=""))}">{_e(e.event_id[:24])}…</a></td>'
        f"<td>{_e(e.subscription_id)}</td><td>{_e(e.event_name)}</td>"
        f'<td class="{css}">{_e(status)}</td><td class="num">{e.retry_count}</td>'
        f'<td class="num">{duration}</td><td class="err">{_e(e.error) if e.error else ""}</td></tr>'
    )


def event(base: str, event_id: str, entries: Sequence[MonitorEntry]) -> str:
    if not entries:
        return page(
            "Event", f'<p class="note">No entry for event {_e(event_id)}.</p>', base=base, active="events"
        )
    parts = [f"<p>Event <code>{_e(event_id)}</code></p>"]
    for e in entries:
        timeline = [
            ("started", e.started_at),
            ("completed" if e.status is not MonitorStatus.FAILED else "failed", e.completed_at),
        ]
        parts.append(
            f"<h2>{_e(e.subscription_id)}: {_e(e.status.value)}</h2><table>"
            + "".join(f"<tr><th>{label}</th><td>{_e(at)}</td></tr>" for label, at in timeline)
            + f"<tr><th>attempts</th><td>{e.retry_count + 1} ({e.retry_count} retries)</td></tr>"
            f"<tr><th>duration</th><td>{_e(e.duration_ms)} ms</td></tr>"
            f"<tr><th>bus / process</th><td>{_e(e.bus_id)} / {_e(e.instance_id)}</td></tr>"
            f'<tr><th>error</th><td class="err">{_e(e.error)}</td></tr>'
            f"<tr><th>metadata</th><td><pre>{_e(_pretty(e.metadata))}</pre></td></tr></table>"
        )
    return page("Event", "".join(parts), base=base, active="events")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, sort_keys=True)


DONE_MESSAGES = {
    "replayed": "Replayed: the callback ran and succeeded.",
    "failed": "The replay failed again; the dead letter stays (see its replay count).",
    "quarantined": "The replay failed and the dead letter was quarantined.",
    "skipped": "Skipped: already replayed, quarantined, or not replayable by this process.",
    "deleted": "Deleted.",
    "bulk": "Bulk replay done.",
}


def dead_letters(
    base: str,
    letters: Sequence[DeadLetter],
    total: int,
    params: Mapping[str, str],
    *,
    can_write: bool,
    can_replay: bool,
    done: str | None,
    result: str | None = None,
) -> str:
    body = []
    if done in DONE_MESSAGES:
        body.append(
            f'<p class="done" id="done">{DONE_MESSAGES[done]}{" " + _e(result) if result else ""}</p>'
        )
    if not can_replay:
        body.append(
            '<p class="note">This dashboard cannot replay: a dead letter is replayed where its subscription\'s '
            "callback lives. Mount it with <code>wsgi_app(..., replay=bus)</code> in that process, or run "
            "<code>mongo-events dlq replay --app module:bus</code> there.</p>"
        )
    include = params.get("include_replayed") == "1"
    body.append(
        f'<form class="filters" method="get" action="{_link(base, "/dead-letters")}">'
        f'<label>Error contains<input name="error" value="{_e(params.get("error", ""))}"></label>'
        f'<label>Subscription<input name="event_name" value="{_e(params.get("event_name", ""))}"></label>'
        f'<label><span><input type="checkbox" name="include_replayed" value="1"{" checked" if include else ""}> '
        'include replayed and quarantined</span></label><button type="submit">Filter</button></form>'
    )
    kept = {k: params[k] for k in ("error", "event_name", "include_replayed") if params.get(k)}
    if can_write and can_replay and letters:
        body.append(
            f'<p><a class="button" id="bulk-replay" href="{_link(base, "/dead-letters/replay", kept)}">'
            f"Replay all {total:,} matching…</a></p>"
        )
    if not letters:
        body.append('<p class="note" id="empty">No dead letters match.</p>')
    else:
        rows = []
        for d in letters:
            path = "/dead-letters/" + quote(d.id, safe="")
            state = "quarantined" if d.quarantined_at else "replayed" if d.retried_at else "waiting"
            actions = ""
            if can_write:
                if can_replay and state == "waiting":
                    actions += f'<a class="button replay" href="{_link(base, path + "/replay")}">Replay</a> '
                actions += (
                    f'<a class="button danger delete" href="{_link(base, path + "/delete")}">Delete</a>'
                )
            rows.append(
                f'<tr class="dead-letter" data-id="{_e(d.id)}"><td class="time">{_e(d.created_at)}</td>'
                f'<td><a href="{_link(base, path)}">{_e(d.event_name)}</a></td><td>{_e(d.source)}</td>'
                f'<td class="err">{_e(d.error)}</td><td class="num">{d.retry_count}</td>'
                f'<td class="num">{d.replay_count}</td><td>{state}</td><td class="actions">{actions}</td></tr>'
            )
        body.append(
            '<table id="dead-letters"><tr><th>Created</th><th>Subscription</th><th>Bus</th><th>Error</th>'
            f"<th>Retries</th><th>Replays</th><th>State</th><th></th></tr>{''.join(rows)}</table>"
            f"<p>{len(letters):,} of {total:,} shown.</p>"
        )
    return page("Dead letters", "".join(body), base=base, active="dead-letters")


def dead_letter(base: str, d: DeadLetter) -> str:
    rows = [
        ("id", d.id),
        ("subscription", d.event_name),
        ("bus", d.source),
        ("event id", d.original_id),
        ("created", d.created_at),
        ("retries", d.retry_count),
        ("replays", d.replay_count),
        ("replayed at", d.retried_at),
        ("quarantined at", d.quarantined_at),
    ]
    body = (
        "<table>"
        + "".join(f"<tr><th>{label}</th><td>{_e(v)}</td></tr>" for label, v in rows)
        + f'<tr><th>error</th><td class="err">{_e(d.error)}</td></tr></table>'
        f"<h2>Metadata</h2><pre>{_e(_pretty(d.metadata))}</pre>"
        f'<h2>Payload</h2><pre id="payload">{_e(_pretty(d.payload))}</pre>'
    )
    return page("Dead letter", body, base=base, active="dead-letters")


def confirm(
    base: str, action: str, target: str, what: str, csrf: str, hidden: Mapping[str, str] | None = None
) -> str:
    """The confirmation step: a page whose one button POSTs ``action`` with the CSRF token."""
    fields = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">'
        for k, v in {**(hidden or {}), "csrf_token": csrf}.items()
    )
    danger = " danger" if action == "delete" else " primary"
    body = (
        f"<p>{_e(what)}</p>"
        f'<form method="post" action="{_link(base, target)}">{fields}'
        f'<button type="submit" id="confirm" class="{danger.strip()}">Yes, {_e(action)}</button> '
        f'<a class="button" id="cancel" href="{_link(base, "/dead-letters")}">Cancel</a></form>'
    )
    return page(f"Confirm {action}", body, base=base, active="dead-letters")


def message(base: str, title: str, text: str, status: int) -> str:
    return page(title, f'<p class="note">{_e(text)}</p>', base=base, active="")
