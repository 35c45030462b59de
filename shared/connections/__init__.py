"""Connections: Slack, Discord, GitHub, Notion and custom webhooks that receive the review queue.

- `schemas`: request/response shapes and the typed rows passed around;
- `providers`: the live calls (verify, send) per kind, all through the egress guard;
- `service`: create / re-verify / delete, with audit rows;
- `delivery`: the outbox worker (claim with SKIP LOCKED, lease, backoff, broken connections);
- `rotate`: re-seal every credential under a new key (``python -m shared.connections.rotate``).

docs/connections.md explains the decisions.
"""
