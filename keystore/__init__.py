"""keystore: who may enter. PostgreSQL schema, key and API-key storage, the HTTP key API."""
