//! Integration tests: the real server on port 0, spoken to over real WebSocket and HTTP,
//! against SQLite and against a fresh PostgreSQL database per test.

mod harness;
mod recorder;

mod abandoned;
mod auth;
mod catalog;
mod cli;
mod cluster;
mod contract_v2;
mod crash;
mod durability;
mod expiry;
mod faults;
mod fencing;
mod hostile;
mod jsonrpc;
mod limits;
mod live;
mod longpoll;
mod malformed;
mod openrpc;
mod payments;
mod races;
mod reference;
mod reservations;
mod settings;
mod transports;
mod web;
