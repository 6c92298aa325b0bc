//! The control plane of tailnode (being written): the coordination protocol,
//! the coordinator server and the controller client.
pub mod controller;
pub mod coordinator;
pub mod proto;
