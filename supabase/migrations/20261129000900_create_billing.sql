-- Create billing state and the Stripe event ledger.
--
-- Tables: public.billing_accounts, public.stripe_events.
-- Why: Stripe is the source of truth for subscriptions; webhooks arrive out of order and more
-- than once. stripe_events records each event id once (insert ... on conflict (id) do nothing,
-- act only when a row came back); billing_accounts keeps the latest state, ordered by
-- state_updated_at so an older event never overwrites a newer one. Owners and admins read both
-- for their organization; only the server writes.

create table public.billing_accounts (
  org_id uuid primary key references public.organizations (id) on delete cascade,
  stripe_customer_id text unique,
  stripe_subscription_id text null,
  subscription_status text null,
  plan text not null default 'free',
  current_period_end timestamptz null,
  state_updated_at timestamptz null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on table public.billing_accounts is
  'An organization''s Stripe customer and subscription state. state_updated_at orders out-of-order webhook events.';

create trigger billing_accounts_set_updated_at
  before update on public.billing_accounts
  for each row execute function private.set_updated_at();

alter table public.billing_accounts enable row level security;
revoke all on table public.billing_accounts from anon, authenticated, service_role;
grant select on table public.billing_accounts to authenticated;
grant select, insert, update on table public.billing_accounts to service_role;

create policy "Owners and admins can read their organization's billing account"
  on public.billing_accounts for select
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

create table public.stripe_events (
  id text primary key,
  type text not null,
  org_id uuid null references public.organizations (id) on delete cascade,
  event_created timestamptz null,
  payload jsonb not null,
  received_at timestamptz not null default now(),
  processed_at timestamptz null
);
comment on table public.stripe_events is
  'Ledger of Stripe webhook events, keyed by Stripe event id (deduplication). org_id is null until resolved.';
create index stripe_events_org_id_idx on public.stripe_events (org_id);

alter table public.stripe_events enable row level security;
revoke all on table public.stripe_events from anon, authenticated, service_role;
grant select on table public.stripe_events to authenticated;
grant select, insert, update on table public.stripe_events to service_role;

create policy "Owners and admins can read their organization's Stripe events"
  on public.stripe_events for select
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));
