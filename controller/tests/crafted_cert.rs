//! A crafted certificate upload over real HTTP: a clear 400, and the
//! controller keeps serving.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// A DER element with a short-form length.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = u8::try_from(content.len()).unwrap();
    assert!(len < 0x80);
    [&[tag, len][..], content].concat()
}

fn pem(der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    format!("-----BEGIN CERTIFICATE-----\n{out}\n-----END CERTIFICATE-----\n")
}

#[tokio::test]
async fn a_certificate_with_a_multibyte_validity_time_is_a_400_and_the_controller_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::start_server(dir.path()).await;
    let token = server.new_admin_token.as_ref().unwrap().token.clone();
    // 13 bytes of UTF-8, as a UTCTime is, with 'é' across byte 2.
    let time = der(0x17, "1\u{e9}345678901Z".as_bytes());
    let validity = der(0x30, &[time.clone(), time].concat());
    let tbs = der(
        0x30,
        &[der(0x02, &[1]), der(0x30, &[]), der(0x30, &[]), validity].concat(),
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let upload = json!({
        "host": "shop.example.com",
        "cert_pem": pem(&der(0x30, &tbs)),
        "key_pem": key.serialize_pem(),
    });
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{}/v1/certs", server.addr))
        .bearer_auth(&token)
        .json(&upload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["problems"][0]["path"], "cert_pem", "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid X.509 certificate"),
        "{body}"
    );
    let response = client
        .get(format!("http://{}/v1/certs", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));
    server.shutdown().await.unwrap();
}
