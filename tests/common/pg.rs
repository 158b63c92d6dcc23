//! Throwaway PostgreSQL clusters (filled in by the pg-client work).
