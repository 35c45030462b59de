-- Visitor tokens that a newer token or closing the conversation revokes.
--
-- Tables: public.conversations (new column token_generation, new BEFORE UPDATE trigger).
-- Why: every widget reply carries a fresh visitor token, and each one used to stay valid for its
-- full 24 hours, so a token copied out of a browser kept the conversation open to whoever held it
-- long after the visitor had moved on. Now each stored turn raises the conversation's
-- token_generation and the token it issues names that generation; the widget accepts a token of
-- the current generation or the one before (the visitor's retry when a reply was lost on the way).
-- Closing the conversation raises the generation by two, so every token issued for it is revoked
-- for good: a conversation reopened later does not bring its old tokens back.

alter table public.conversations
  add column token_generation integer not null default 1
    constraint conversations_token_generation_positive check (token_generation >= 1);

comment on column public.conversations.token_generation is
  'Generation of the newest visitor token issued for the conversation; tokens older than the one before it are refused.';

create function private.revoke_tokens_on_close()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.status = 'closed' and old.status is distinct from 'closed' then
    new.token_generation := greatest(new.token_generation, old.token_generation) + 2;
  end if;
  return new;
end
$$;
revoke execute on function private.revoke_tokens_on_close() from public;
comment on function private.revoke_tokens_on_close() is
  'BEFORE UPDATE trigger on public.conversations: closing revokes every visitor token issued so far.';

create trigger conversations_revoke_tokens_on_close
  before update of status on public.conversations
  for each row execute function private.revoke_tokens_on_close();
