-- Rename the review item status 'open' to 'pending'.
--
-- Tables: public.review_items (status check, default, existing rows),
-- public.review_item_status_history (existing rows). Function: private.check_review_item_write().
-- Why: the widget's requirement says review-queue items "enter as pending"; the queue used 'open'
-- for the same state. This is a rename, not a status change: the transitions are unchanged
-- (pending -> in_progress | resolved | dismissed, in_progress -> pending | resolved | dismissed,
-- resolved -> pending, dismissed -> pending), items are still created only in the first status
-- (HH409 otherwise), and history stays append-only (HH403). Conversations keep their own 'open'
-- status, and deliveries their own 'pending': neither is touched here.
--
-- Existing rows are rewritten with three triggers disabled, for this transaction only:
-- * review_items_check_write would refuse 'open' -> 'pending' as an illegal transition (HH409) and
--   would stamp updated_at, although nobody worked the item;
-- * review_items_history_on_status_change would record a status change that never happened;
-- * review_item_status_history_append_only refuses the rewrite of the history rows (HH403).
-- History is rewritten too, so that it uses the same words as the items it describes: a reader
-- following an item's history from creation to its current status never meets a status the table
-- no longer allows. ALTER TABLE ... DISABLE TRIGGER locks each table against concurrent writes
-- until commit, and the triggers are enabled again before commit, so no other transaction ever
-- writes either table while they are off.

alter table public.review_items drop constraint review_items_status_check;
alter table public.review_items alter column status set default 'pending';

alter table public.review_items disable trigger review_items_check_write;
alter table public.review_items disable trigger review_items_history_on_status_change;
alter table public.review_item_status_history disable trigger review_item_status_history_append_only;

update public.review_items set status = 'pending' where status = 'open';

update public.review_item_status_history
   set from_status = case when from_status = 'open' then 'pending' else from_status end,
       to_status = case when to_status = 'open' then 'pending' else to_status end
 where from_status = 'open' or to_status = 'open';

alter table public.review_item_status_history enable trigger review_item_status_history_append_only;
alter table public.review_items enable trigger review_items_history_on_status_change;
alter table public.review_items enable trigger review_items_check_write;

alter table public.review_items add constraint review_items_status_check
  check (status in ('pending', 'in_progress', 'resolved', 'dismissed'));

-- ---------------------------------------------------------------------------------------------
-- Transition rules: as before, with 'pending' in place of 'open'.
-- ---------------------------------------------------------------------------------------------
create or replace function private.check_review_item_write()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    if new.status <> 'pending' then
      raise exception 'review items are created with status pending, not %', new.status using errcode = 'HH409';
    end if;
    return new;
  end if;

  if new.status is distinct from old.status and not (
       (old.status = 'pending' and new.status in ('in_progress', 'resolved', 'dismissed'))
    or (old.status = 'in_progress' and new.status in ('pending', 'resolved', 'dismissed'))
    or (old.status = 'resolved' and new.status = 'pending')
    or (old.status = 'dismissed' and new.status = 'pending')
  ) then
    raise exception 'illegal review status transition from % to %', old.status, new.status
      using errcode = 'HH409';
  end if;

  if new.assigned_to is not null
     and new.assigned_to is distinct from old.assigned_to
     and not exists (
       select 1 from public.memberships as m where m.org_id = new.org_id and m.user_id = new.assigned_to
     ) then
    raise exception 'review items can only be assigned to members of their organization' using errcode = 'HH409';
  end if;

  new.updated_at := now();
  return new;
end
$$;
revoke execute on function private.check_review_item_write() from public;
