//! The process runtime: supervised native processes.
