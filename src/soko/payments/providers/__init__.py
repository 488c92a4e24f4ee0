"""Payment providers: one interface (:mod:`.base`), an adapter per provider."""
