"""Team invitations: owners and admins invite teammates by email, through Supabase Auth."""
