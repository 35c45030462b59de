-- Index messages by (org_id, conversation_id, created_at) for the dashboard's transcript queries.
--
-- Tables: public.messages (index added, one index dropped).
-- Why: as a member, reading a conversation's messages carries the RLS filter
-- `org_id = any (array(select private.user_org_ids()))` as well as `conversation_id = …`. With
-- separate indexes the planner ANDs two bitmaps and reads every message of the organization for
-- each conversation (measured by bench/bench_rls.py: 1.9x the service-role time). One index
-- leading on org_id and then conversation_id answers both conditions in a single scan, and it
-- makes the plain org_id index redundant (its leading column is the same).

create index messages_org_id_conversation_id_created_at_idx
  on public.messages (org_id, conversation_id, created_at);

drop index public.messages_org_id_idx;
