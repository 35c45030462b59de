-- Create widget conversations and their messages.
--
-- Tables: public.conversations, public.messages.
-- Why: every widget exchange is kept as a transcript the organization's members can read. The
-- server (service_role) writes them; no client writes. Statement-level triggers keep
-- conversations.message_count and last_message_at in step with the messages, for every writer.

create table public.conversations (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid not null,
  visitor_id text not null check (char_length(visitor_id) between 1 and 200),
  origin text null check (char_length(origin) <= 2048),
  status text not null default 'open' check (status in ('open', 'escalated', 'closed')),
  message_count integer not null default 0 check (message_count >= 0),
  last_message_at timestamptz null,
  created_at timestamptz not null default now(),
  constraint conversations_id_org_id_key unique (id, org_id),
  constraint conversations_agent_fkey foreign key (agent_id, org_id)
    references public.agents (id, org_id) on delete cascade
);
comment on table public.conversations is
  'A widget visitor''s conversation with an agent. message_count and last_message_at are maintained by triggers.';
create index conversations_org_id_last_message_at_idx on public.conversations (org_id, last_message_at desc);
create index conversations_agent_id_idx on public.conversations (agent_id);

create table public.messages (
  id bigint generated always as identity primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  conversation_id uuid not null,
  role text not null check (role in ('visitor', 'agent', 'system')),
  content text not null check (char_length(content) <= 100000),
  created_at timestamptz not null default now(),
  constraint messages_conversation_fkey foreign key (conversation_id, org_id)
    references public.conversations (id, org_id) on delete cascade
);
comment on table public.messages is 'The transcript of a conversation, one row per message.';
create index messages_conversation_id_created_at_idx on public.messages (conversation_id, created_at);
create index messages_org_id_idx on public.messages (org_id);

create function private.count_inserted_messages()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  update public.conversations as c
     set message_count = c.message_count + n.added,
         last_message_at = greatest(c.last_message_at, n.last_at)
    from (
      select conversation_id, count(*)::integer as added, max(created_at) as last_at
        from new_rows
       group by conversation_id
    ) as n
   where c.id = n.conversation_id;
  return null;
end
$$;
revoke execute on function private.count_inserted_messages() from public;

create function private.count_deleted_messages()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  update public.conversations as c
     set message_count = greatest(c.message_count - d.removed, 0),
         last_message_at = (
           select max(m.created_at) from public.messages as m where m.conversation_id = c.id
         )
    from (
      select conversation_id, count(*)::integer as removed
        from old_rows
       group by conversation_id
    ) as d
   where c.id = d.conversation_id;
  return null;
end
$$;
revoke execute on function private.count_deleted_messages() from public;

create trigger messages_count_inserted
  after insert on public.messages
  referencing new table as new_rows
  for each statement execute function private.count_inserted_messages();

create trigger messages_count_deleted
  after delete on public.messages
  referencing old table as old_rows
  for each statement execute function private.count_deleted_messages();

alter table public.conversations enable row level security;
revoke all on table public.conversations from anon, authenticated, service_role;
grant select on table public.conversations to authenticated;
grant select, insert, update, delete on table public.conversations to service_role;

create policy "Members can read their organization's conversations"
  on public.conversations for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

alter table public.messages enable row level security;
revoke all on table public.messages from anon, authenticated, service_role;
revoke all on sequence public.messages_id_seq from anon, authenticated, service_role;
grant select on table public.messages to authenticated;
grant select, insert, update, delete on table public.messages to service_role;

create policy "Members can read their organization's messages"
  on public.messages for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));
