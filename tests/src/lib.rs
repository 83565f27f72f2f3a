//! Test support for the privileged suites.
