"""Identity and access: accounts, sign-in, sessions, MFA, roles, API keys and audit."""
