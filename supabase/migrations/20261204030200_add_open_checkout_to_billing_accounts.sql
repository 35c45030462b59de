-- At most one open Stripe Checkout per organization.
--
-- Tables: public.billing_accounts (new columns checkout_attempt, checkout_plan,
-- checkout_expires_at, checkout_claimed_at, checkout_session_id, checkout_url).
-- Why: two checkout starts for one organization each created a session, so an organization could
-- pay for two subscriptions. The account row now holds the organization's one current checkout:
-- a start locks the row and either reuses the open session, waits for the one being created, or
-- claims a new attempt (expiring the previous session at Stripe first). checkout_attempt numbers
-- the attempts and is part of the Stripe idempotency key, so a retried create for one attempt
-- can only ever get that attempt's session back. Written by the server only; owners and admins
-- read it through the existing policy.

alter table public.billing_accounts
  add column checkout_attempt integer not null default 0 constraint billing_accounts_checkout_attempt_nonnegative
    check (checkout_attempt >= 0),
  add column checkout_plan text null,
  add column checkout_expires_at timestamptz null,
  add column checkout_claimed_at timestamptz null,
  add column checkout_session_id text null,
  add column checkout_url text null,
  add constraint billing_accounts_checkout_complete check (
    (checkout_plan is null) = (checkout_expires_at is null)
    and (checkout_session_id is null or checkout_plan is not null)
    and (checkout_session_id is null) = (checkout_url is null)
  );

comment on column public.billing_accounts.checkout_attempt is
  'Number of the organization''s current checkout attempt; part of the Stripe idempotency key.';
comment on column public.billing_accounts.checkout_plan is
  'Plan of the current checkout attempt; null when there is none.';
comment on column public.billing_accounts.checkout_claimed_at is
  'When a start claimed the current attempt; with checkout_session_id null, the session is being created.';
comment on column public.billing_accounts.checkout_session_id is
  'The current attempt''s Stripe Checkout Session, once created; cleared when it completes.';
