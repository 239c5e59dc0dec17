//! Host name resolution without libc's resolver.
//!
//! The binary is static and its image is `FROM scratch`: glibc's
//! `getaddrinfo` would need NSS modules that are not there. What a test
//! needs is small: IP literals, `/etc/hosts` (Docker writes the
//! container's own name there) and an A query to the servers of
//! `/etc/resolv.conf` (Docker's embedded DNS, which answers app names on a
//! project network).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio::net::UdpSocket;

pub async fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(ip);
    }
    if host == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for line in hosts.lines() {
            let mut words = line
                .split('#')
                .next()
                .unwrap_or_default()
                .split_whitespace();
            let Some(ip) = words.next().and_then(|ip| ip.parse::<IpAddr>().ok()) else {
                continue;
            };
            if words.any(|name| name.eq_ignore_ascii_case(host)) {
                return Ok(ip);
            }
        }
    }
    let servers: Vec<IpAddr> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("nameserver"))
        .filter_map(|server| server.trim().parse().ok())
        .collect();
    if servers.is_empty() {
        return Err("no name servers in /etc/resolv.conf".to_owned());
    }
    let mut last = String::new();
    for server in servers {
        match query(server, host).await {
            Ok(Some(ip)) => return Ok(IpAddr::V4(ip)),
            Ok(None) => last = format!("{server} has no address for it"),
            Err(error) => last = format!("{server}: {error}"),
        }
    }
    Err(last)
}

async fn query(server: IpAddr, host: &str) -> Result<Option<Ipv4Addr>, String> {
    let socket = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await
    .map_err(|e| e.to_string())?;
    socket
        .connect((server, 53))
        .await
        .map_err(|e| e.to_string())?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question.
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in host.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..64).contains(l))
            .ok_or_else(|| format!("bad label {label:?}"))?;
        packet.push(len);
        packet.extend_from_slice(label.as_bytes());
    }
    // Root, type A, class IN.
    packet.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send(&packet).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut answer))
        .await
        .map_err(|_| "no answer within 1 s".to_owned())?
        .map_err(|e| e.to_string())?;
    parse_answer(&answer[..n], id)
}

fn skip_name(packet: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *packet.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        if len == 0 {
            return Some(at + 1);
        }
        at += 1 + usize::from(len);
    }
}

fn parse_answer(packet: &[u8], id: u16) -> Result<Option<Ipv4Addr>, String> {
    let short = || "short answer".to_owned();
    if packet.len() < 12 || packet[..2] != id.to_be_bytes() {
        return Err("not our answer".to_owned());
    }
    let rcode = packet[3] & 0x0f;
    if rcode == 3 {
        return Ok(None);
    }
    if rcode != 0 {
        return Err(format!("server failure (rcode {rcode})"));
    }
    let questions = u16::from_be_bytes([packet[4], packet[5]]);
    let answers = u16::from_be_bytes([packet[6], packet[7]]);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(packet, at).ok_or_else(short)? + 4;
    }
    for _ in 0..answers {
        at = skip_name(packet, at).ok_or_else(short)?;
        let fixed = packet.get(at..at + 10).ok_or_else(short)?;
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let length = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        at += 10;
        let data = packet.get(at..at + length).ok_or_else(short)?;
        if kind == 1 && length == 4 {
            return Ok(Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])));
        }
        at += length;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_answer_with_a_cname_then_an_a_record_parses() {
        let mut packet = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        packet.extend_from_slice(&[3, b'w', b'e', b'b', 0, 0, 1, 0, 1]);
        // CNAME pointing at the question's name, then an A record.
        packet.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        packet.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 172, 18, 0, 2]);
        assert_eq!(
            parse_answer(&packet, 0x1234).unwrap(),
            Some(Ipv4Addr::new(172, 18, 0, 2))
        );
        packet[3] = 0x83; // NXDOMAIN
        assert_eq!(parse_answer(&packet, 0x1234).unwrap(), None);
        assert!(parse_answer(&packet, 0x4321).is_err());
    }
}
