-- Keep only what the Stripe event ledger needs, and scrub what it held before.
--
-- Tables: public.stripe_events (drops payload; adds object_type, object_id, customer_id,
-- subscription_id).
-- Why: the ledger stored every event's full JSON, including types we ignore. charge.succeeded
-- alone carries the card's brand, last four digits, expiry, fingerprint and the billing details.
-- The webhook only needs the event's id, type, created, outcome and the ids of the objects it is
-- about, so that is all a row keeps now. Existing rows get their ids backfilled from the payload
-- (only values shaped like Stripe ids), then the payload column is dropped and the table rewritten,
-- so the old values are gone from the table's files too, not just hidden behind a dropped column.

alter table public.stripe_events
  add column object_type text null
    constraint stripe_events_object_type_format check (object_type ~ '^[a-z][a-z0-9_.]{0,99}$'),
  add column object_id text null
    constraint stripe_events_object_id_format check (object_id ~ '^[A-Za-z0-9_]{3,255}$'),
  add column customer_id text null
    constraint stripe_events_customer_id_format check (customer_id ~ '^cus_[A-Za-z0-9_]{1,251}$'),
  add column subscription_id text null
    constraint stripe_events_subscription_id_format check (subscription_id ~ '^sub_[A-Za-z0-9_]{1,251}$');

comment on column public.stripe_events.object_type is 'The event''s data.object.object (subscription, invoice, charge, ...).';
comment on column public.stripe_events.object_id is 'The id of the object the event is about.';
comment on column public.stripe_events.customer_id is 'The Stripe customer the object belongs to, when it names one.';
comment on column public.stripe_events.subscription_id is 'The subscription the event is about (for invoices and checkouts too).';

-- An expandable field is an id string or an expanded object with an id; anything else is not kept.
update public.stripe_events as e
   set object_type = case when o ->> 'object' ~ '^[a-z][a-z0-9_.]{0,99}$' then o ->> 'object' end,
       object_id = case when o ->> 'id' ~ '^[A-Za-z0-9_]{3,255}$' then o ->> 'id' end,
       customer_id = (
         select c from (values (o ->> 'customer'), (o -> 'customer' ->> 'id')) as v (c)
          where c ~ '^cus_[A-Za-z0-9_]{1,251}$' limit 1
       ),
       subscription_id = (
         select s from (
           values (case when o ->> 'object' = 'subscription' then o ->> 'id' end),
                  (o ->> 'subscription'), (o -> 'subscription' ->> 'id'),
                  (o #>> '{parent,subscription_details,subscription}')
         ) as v (s)
          where s ~ '^sub_[A-Za-z0-9_]{1,251}$' limit 1
       )
  from (select id, payload -> 'data' -> 'object' as o from public.stripe_events) as p
 where p.id = e.id
   and jsonb_typeof(p.o) = 'object';

alter table public.stripe_events drop column payload;

-- A dropped column's values stay in the heap until the table is rewritten; cluster rewrites it
-- (and writes nulls for dropped columns) inside this migration's transaction.
cluster public.stripe_events using stripe_events_pkey;
alter table public.stripe_events set without cluster;

comment on table public.stripe_events is
  'Ledger of Stripe webhook events, keyed by Stripe event id (deduplication): id, type, created, outcome '
  'and the ids of the objects the event is about, never the event''s payload. org_id is null until resolved.';
