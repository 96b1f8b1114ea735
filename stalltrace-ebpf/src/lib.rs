#![no_std]
// This file exists so that the userspace crate can depend on this package (cargo then rebuilds
// the programs when their sources change); the programs themselves live in main.rs.
