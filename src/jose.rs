//! jose
