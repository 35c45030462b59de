-- Demo data for the local stack: one user, one organization, one agent with a widget key,
-- and two knowledge chunks so the offline provider has something to answer from.
--
-- Applied after the migrations (by the local stack and by `supabase db reset`). Safe to re-run.
-- The widget key below is for local use only: hh_wk_demo_local_only_0000000000000000
-- (stored, like every widget key, as its SHA-256 hash).

insert into auth.users (
  instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
  raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous
)
values (
  '00000000-0000-0000-0000-000000000000',
  '00000000-0000-4000-8000-000000000001',
  'authenticated',
  'authenticated',
  'demo@hiredhands.dev',
  null,
  now(),
  '{"provider": "email", "providers": ["email"]}',
  '{"full_name": "Demo User"}',
  now(),
  now(),
  false
)
on conflict (id) do nothing;

-- created_by makes the demo user the owner (AFTER INSERT trigger), and creates the limits row.
insert into public.organizations (id, name, created_by)
values ('00000000-0000-4000-8000-0000000000a1', 'Demo Co', '00000000-0000-4000-8000-000000000001')
on conflict (id) do nothing;

insert into public.memberships (org_id, user_id, role)
values ('00000000-0000-4000-8000-0000000000a1', '00000000-0000-4000-8000-000000000001', 'owner')
on conflict (org_id, user_id) do nothing;

insert into public.agents (
  id, org_id, name, display_name, greeting, system_prompt, widget_enabled,
  widget_key_hash, widget_key_hint, widget_key_rotated_at, allowed_origins
)
values (
  '00000000-0000-4000-8000-0000000000b1',
  '00000000-0000-4000-8000-0000000000a1',
  'Demo Agent',
  'Demo Co Help',
  'Hi! Ask me about Demo Co''s opening hours or returns.',
  'You answer questions about Demo Co using only its knowledge base.',
  true,
  sha256(convert_to('hh_wk_demo_local_only_0000000000000000', 'UTF8')),
  '0000',
  now(),
  array['http://localhost:3000']
)
on conflict (id) do nothing;

insert into public.knowledge_chunks (org_id, agent_id, url, title, content, content_hash)
select v.org_id, v.agent_id, v.url, v.title, v.content, sha256(convert_to(v.content, 'UTF8'))
  from (
    values
      ('00000000-0000-4000-8000-0000000000a1'::uuid,
       '00000000-0000-4000-8000-0000000000b1'::uuid,
       'http://localhost:3000/hours',
       'Opening hours',
       'Demo Co is open Monday to Friday from 9:00 to 17:30 and Saturday from 10:00 to 14:00. '
       'We are closed on Sundays and public holidays. Phone support follows the same hours.'),
      ('00000000-0000-4000-8000-0000000000a1'::uuid,
       '00000000-0000-4000-8000-0000000000b1'::uuid,
       'http://localhost:3000/returns',
       'Returns policy',
       'You can return any unused item within 30 days of delivery for a full refund. '
       'Start a return from your order page; we email a prepaid label, and refunds reach your '
       'original payment method within 5 business days of the item arriving back at Demo Co.')
  ) as v (org_id, agent_id, url, title, content)
 where not exists (
   select 1 from public.knowledge_chunks as k
    where k.agent_id = v.agent_id and k.title = v.title
 );
