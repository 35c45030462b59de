"""RLS cost: the dashboard's "latest conversations with message counts" as a member vs as the service.

Builds 1,000 organizations, 20,000 conversations and 1,000,000 messages in a fresh embedded
database, then runs the same query through ``as_user`` (RLS on both tables) and ``as_service``
(RLS bypassed), interleaved so machine noise hits both alike, and prints the median ratio.

    .venv/bin/python bench/bench_rls.py [--orgs 1000] [--messages-per-conversation 50] [--rounds 300]

Target: median ratio under 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from shared.local.database import apply_schema, create_database, start_server

QUERY = """
select c.id, c.visitor_id, c.last_message_at,
       (select count(*) from public.messages m where m.conversation_id = c.id) as messages
from public.conversations c
where c.org_id = %(org)s
order by c.last_message_at desc
limit 20
"""


def build(admin_url: str, orgs: int, conversations_per_org: int, messages_per_conversation: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # bulk load: skip per-row triggers
        conn.execute(
            "insert into auth.users (id, aud, role, email)"
            " select gen_random_uuid(), 'authenticated', 'authenticated', 'u' || g || '@bench.test'"
            " from generate_series(1, %s) g",
            (orgs,),
        )
        conn.execute(
            "insert into public.organizations (id, name, created_by)"
            " select gen_random_uuid(), 'Org ' || row_number() over (), id from auth.users"
        )
        conn.execute(
            "insert into public.memberships (org_id, user_id, role) select id, created_by, 'owner'"
            " from public.organizations"
        )
        conn.execute("insert into public.agents (org_id, name) select id, 'agent' from public.organizations")
        conn.execute(
            "insert into public.conversations (org_id, agent_id, visitor_id, last_message_at)"
            " select a.org_id, a.id, 'v' || g, now() - g * interval '1 minute'"
            " from public.agents a, generate_series(1, %s) g",
            (conversations_per_org,),
        )
        conn.execute(
            "insert into public.messages (org_id, conversation_id, role, content)"
            " select c.org_id, c.id, 'visitor', 'message ' || g"
            " from public.conversations c, generate_series(1, %s) g",
            (messages_per_conversation,),
        )
        conn.execute("analyze")


async def measure(rounds: int) -> None:
    from shared.db.pool import close_pools
    from shared.db.session import as_service, as_user, get_database

    db = get_database()
    admin = os.environ["BENCH_ADMIN_URL"]
    with psycopg.connect(admin) as conn:
        rows = conn.execute(
            "select m.org_id, m.user_id from public.memberships m order by random() limit %s", (rounds,)
        ).fetchall()
    user_times: list[float] = []
    service_times: list[float] = []
    for org_id, user_id in rows:
        claims = {"sub": str(user_id), "aud": "authenticated", "role": "authenticated"}
        for path in ("user", "service"):
            started = time.perf_counter()
            if path == "user":
                async with as_user(db, claims) as conn:
                    result = await (await conn.execute(QUERY, {"org": org_id})).fetchall()
                user_times.append(time.perf_counter() - started)
            else:
                async with as_service(db) as conn:
                    result = await (await conn.execute(QUERY, {"org": org_id})).fetchall()
                service_times.append(time.perf_counter() - started)
            assert len(result) == 20, "each organization has 20 conversations"
    await close_pools()
    user_median = statistics.median(user_times) * 1000
    service_median = statistics.median(service_times) * 1000
    print(f"rounds: {len(rows)} organizations, each query through the real pool and transaction setup")
    print(f"as member (RLS):      median {user_median:.3f} ms, p99 {_p99(user_times):.3f} ms")
    print(f"as service_role:      median {service_median:.3f} ms, p99 {_p99(service_times):.3f} ms")
    print(f"median ratio member/service: {user_median / service_median:.2f}x (target < 1.5x)")


def _p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--conversations-per-org", type=int, default=20)
    parser.add_argument("--messages-per-conversation", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-pg")
    create_database(server, "bench_rls", replace=True)
    apply_schema(server.url("bench_rls"), seed=False)
    started = time.perf_counter()
    build(server.url("bench_rls"), args.orgs, args.conversations_per_org, args.messages_per_conversation)
    total = args.orgs * args.conversations_per_org * args.messages_per_conversation
    print(f"built {args.orgs} organizations, {total:,} messages in {time.perf_counter() - started:.1f} s")
    os.environ["DATABASE_URL"] = server.url("bench_rls", user="authenticator")
    os.environ["BENCH_ADMIN_URL"] = server.url("bench_rls")
    asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    main()
