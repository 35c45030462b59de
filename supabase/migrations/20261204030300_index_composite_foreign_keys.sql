-- Cover the organization-scoped foreign keys with indexes in their own column order.
--
-- Tables: public.knowledge_sources, public.scans, public.knowledge_chunks, public.conversations,
-- public.review_items, public.review_item_status_history, public.deliveries (indexes replaced).
-- Why: each child row references its parent by (parent_id, org_id), so a tenant's row can never
-- point at another tenant's parent. Supabase's linter (0001 unindexed_foreign_keys) wants an index
-- whose leading columns are the key's columns in order; most tables had one on parent_id alone.
-- Each such index is replaced by one on (parent_id, org_id): the same leading column, so every
-- query the old index served it still serves, the cascade and the key check probe both columns,
-- and no table gains an index to maintain on write.
--
-- Three keys keep the index they have, on purpose (tests/db/test_catalog.py holds the list):
-- * messages_conversation_fkey: messages (conversation_id, created_at) already leads with the
--   conversation, and the widget reads a conversation's last messages in that order with a limit;
--   a (conversation_id, org_id) index would be a third index on the most written table, for a
--   check that probes one conversation's rows either way.
-- * deliveries_review_item_fkey: unique (review_item_id, connection_id) leads with the review item
--   (at most one delivery per item and connection).
-- * connection_credentials_connection_fkey: connection_id is the primary key (one row per
--   connection).

drop index public.knowledge_sources_agent_id_idx;
create index knowledge_sources_agent_id_org_id_idx on public.knowledge_sources (agent_id, org_id);

drop index public.scans_agent_id_idx;
create index scans_agent_id_org_id_idx on public.scans (agent_id, org_id);
drop index public.scans_source_id_idx;
create index scans_source_id_org_id_idx on public.scans (source_id, org_id);

drop index public.knowledge_chunks_agent_id_idx;
create index knowledge_chunks_agent_id_org_id_idx on public.knowledge_chunks (agent_id, org_id);
drop index public.knowledge_chunks_source_id_idx;
create index knowledge_chunks_source_id_org_id_idx on public.knowledge_chunks (source_id, org_id);

drop index public.conversations_agent_id_idx;
create index conversations_agent_id_org_id_idx on public.conversations (agent_id, org_id);

drop index public.review_items_agent_id_idx;
create index review_items_agent_id_org_id_idx on public.review_items (agent_id, org_id);
drop index public.review_items_conversation_id_idx;
create index review_items_conversation_id_org_id_idx on public.review_items (conversation_id, org_id);

-- The history of one item is a handful of rows; ordering them by changed_at needs no index.
drop index public.review_item_status_history_item_idx;
create index review_item_status_history_item_org_id_idx
  on public.review_item_status_history (review_item_id, org_id, changed_at);

drop index public.deliveries_connection_id_idx;
create index deliveries_connection_id_org_id_idx on public.deliveries (connection_id, org_id);
